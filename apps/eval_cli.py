"""``segswap-eval {brueghel,pitts,tokyo,internet}``: the paper's benchmarks, one command each.

Every command writes a JSON of results (``--out``) and prints a table. Dataset formats are described in
the modules: :mod:`segswap.apps.brueghel`, :mod:`segswap.apps.placerec`, :mod:`segswap.apps.internet`.
"""
from __future__ import annotations

import argparse
import os
import sys

from segswap.apps.cli_common import Progress, load, log, model_parser, setup_logging, table, write_json
from segswap.core.cli import add_version


def build_parser() -> argparse.ArgumentParser:
    parent = model_parser()
    p = argparse.ArgumentParser(prog="segswap-eval", description="Evaluate a SegSwap model on the paper's benchmarks.")
    add_version(p)
    sub = p.add_subparsers(dest="benchmark", required=True)

    b = sub.add_parser("brueghel", parents=[parent], help="art-detail retrieval, AP per category then mean")
    b.add_argument("--labels", required=True, help="brueghelTest.json / brueghelVal.json")
    b.add_argument("--images", required=True, help="folder of Brueghel images (the database)")
    b.add_argument("--size", type=int, default=640, help="database images resized to SIZE x SIZE (640)")
    b.add_argument("--query-box-size", type=int, default=64,
                   help="query resized so its box's longer side is ~N px (official default 64)")
    b.add_argument("--rerank-topk", type=int, default=None,
                   help="re-rank only the top K of a dense-cosine baseline (default: score every image)")
    b.add_argument("--out", required=True, help="results JSON")

    for name, vpp in (("pitts", 1), ("tokyo", 12)):
        s = sub.add_parser(name, parents=[parent], help=f"place recognition on {'Pitts30k' if vpp == 1 else 'Tokyo 24/7'}: "
                                                        "re-rank a top-100 list, Recall@1/5/10 at 25 m")
        s.add_argument("--root", required=True, help="dataset root the image lists are relative to")
        s.add_argument("--queries", required=True, help="query image list (Patch-NetVLAD imageNames txt)")
        s.add_argument("--database", required=True, help="database image list (Patch-NetVLAD imageNames txt)")
        s.add_argument("--gt", required=True, help="npz with utmQ, utmDb (and posDistThr), Patch-NetVLAD style")
        s.add_argument("--candidates", required=True,
                       help="NetVLAD_predictions.txt (kapture), [Nq,K] int .npy, or [Nq,Ndb] score .npy")
        s.add_argument("--topk", type=int, default=100, help="candidates re-ranked per query (100)")
        s.add_argument("--dist", type=float, default=None, help="metres for a correct match (npz posDistThr, else 25)")
        s.add_argument("--views-per-place", type=int, default=vpp,
                       help=f"database views per place for spatial NMS ({vpp}; 1 disables)")
        s.add_argument("--width", type=int, default=640)
        s.add_argument("--height", type=int, default=480)
        s.add_argument("--out", required=True, help="results JSON")

    i = sub.add_parser("internet", parents=[parent], help="co-segmentation: P and J per class")
    i.add_argument("root", help="Internet dataset root (Airplane100/, Car100/, Horse100/) or one folder of images")
    i.add_argument("--masks-dir", default="GroundTruth", help="mask subfolder name (GroundTruth)")
    i.add_argument("--size", type=int, default=480)
    i.add_argument("--top-k", type=int, default=5)
    i.add_argument("--threshold", type=float, default=0.85, help="mask threshold for graph vertices (0.85)")
    i.add_argument("--sigma", type=float, default=1.0, help="Eq. 4 sigma in grid cells (1.0)")
    i.add_argument("--workdir", default=None, help="cache of predictions (default: next to --out)")
    i.add_argument("--save-masks", action="store_true", help="write predicted masks next to --out")
    i.add_argument("--out", required=True, help="results JSON")
    return p


def run_brueghel(args) -> tuple[dict, str]:
    from segswap.apps import brueghel

    labels = brueghel.load_labels(args.labels)
    model, cache = load(args)
    res = brueghel.evaluate(model, labels, args.images, cache, size=args.size, query_box_size=args.query_box_size,
                            rerank_topk=args.rerank_topk, batch_size=args.batch_size, progress=Progress(0, desc="queries", logger=log))
    rows = [[c, v["n_queries"], v["ap_cosine"], v["ap"]] for c, v in res["per_category"].items()]
    rows.append(["mean", sum(v["n_queries"] for v in res["per_category"].values()), res["map_cosine"], res["map"]])
    return res, table(rows, ["category", "queries", "AP cosine", "AP SegSwap"])


def run_placerec(args) -> tuple[dict, str]:
    from segswap.apps import placerec

    queries = placerec.read_image_list(args.queries)
    db = placerec.read_image_list(args.database)
    utm_q, utm_db, thr = placerec.read_ground_truth(args.gt, len(queries), len(db))
    dist = args.dist if args.dist is not None else (thr if thr is not None else placerec.DEFAULT_DIST)
    cands = placerec.read_candidates(args.candidates, queries, db, args.root, args.topk)
    model, cache = load(args)
    res = placerec.evaluate(model, queries, db, args.root, cands, utm_q, utm_db, cache, dataset=args.benchmark,
                            size=(args.width, args.height), dist=dist, views_per_place=args.views_per_place,
                            batch_size=args.batch_size, progress=Progress(0, desc="queries", logger=log))
    rows = [["input ranking", *res["recall_input"].values()], ["SegSwap re-ranked", *res["recall"].values()]]
    return res, table(rows, ["", *res["recall"].keys()])


def run_internet(args) -> tuple[dict, str]:
    from segswap.apps import internet

    classes = internet.find_classes(args.root, args.masks_dir)
    model, cache = load(args)
    workdir = args.workdir or os.path.splitext(args.out)[0] + "_work"
    per_class = {}
    for name, folder in classes.items():
        per_class[name] = internet.evaluate_class(
            model, folder, cache, os.path.join(workdir, name), size=args.size, top_k=args.top_k,
            threshold=args.threshold, sigma=args.sigma, masks_dir=args.masks_dir, batch_size=args.batch_size,
            save_masks=(os.path.splitext(args.out)[0] + "_masks/" + name) if args.save_masks else None)
    ps = [v["P"] for v in per_class.values()]
    js = [v["J"] for v in per_class.values()]
    res = {"protocol": "internet", "config": {k: v for k, v in vars(args).items() if k != "log_level"},
           "per_class": per_class, "P": float(sum(ps) / len(ps)), "J": float(sum(js) / len(js))}
    rows = [[c, v["n_scored"], v["P"], v["J"]] for c, v in per_class.items()]
    rows.append(["mean", sum(v["n_scored"] for v in per_class.values()), res["P"], res["J"]])
    return res, table(rows, ["class", "images", "P", "J"])


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(level=args.log_level)
    runner = {"brueghel": run_brueghel, "pitts": run_placerec, "tokyo": run_placerec, "internet": run_internet}
    try:
        res, text = runner[args.benchmark](args)
    except (FileNotFoundError, ValueError) as e:  # dataset problems: the message names the file
        print(f"segswap-eval {args.benchmark}: error: {e}", file=sys.stderr)
        return 2
    write_json(args.out, res)
    print(text)
    print(f"results -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
