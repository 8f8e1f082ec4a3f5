"""``segswap-discover IMAGES --ckpt C --out DIR``: object discovery in an image collection (paper §5).

Steps (each cached in ``DIR/work`` so an interrupted job resumes):

1. backbone features of every image at ``--size`` (square, like the paper's 640x640 for Brueghel);
2. Eq. 3 scores of every image against every other (or against its ``--candidates`` nearest images by
   mean-pooled features, for large collections);
3. each image's ``--top-k`` (5) best images give the pairs of the graph; the third pairs Eq. 4 needs
   (pairs among the images a given image is paired with) are predicted too;
4. vertices = correspondences with mask > ``--threshold``; edges = Eq. 4 with ``--sigma`` (grid cells);
5. ``--n-eig`` leading eigenvectors, K-means with ``--clusters`` clusters;
6. ``DIR/clusters.json`` (clusters sorted by how many images they span, each with its regions as pixel
   boxes in the original images) and ``DIR/sheets/cluster_NNNN.png`` contact sheets of the top clusters.
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import time

import numpy as np
from PIL import Image

from segswap.apps.cli_common import log, model_parser, setup_logging, write_json
from segswap.apps.collection import Collection, closing_pairs, usable_images
from segswap.apps.graph import build_graph, extract_vertices
from segswap.apps.images import list_images
from segswap.apps.sheets import write_sheet
from segswap.apps.spectral import kmeans, spectral_embedding
from segswap.core.cli import add_version

DEFAULTS = {"size": 640, "top_k": 5, "threshold": 0.5, "sigma": 1.0, "min_weight": 0.01, "n_eig": 100,
            "clusters": 500}


def read_image_arg(images: str) -> list[str]:
    """A folder of images, or a text file listing image paths (one per line, relative to the file)."""
    if os.path.isdir(images):
        return [os.path.join(images, f) for f in list_images(images)]
    if os.path.isfile(images):
        base = os.path.dirname(os.path.abspath(images))
        with open(images) as f:
            return [os.path.join(base, ln.strip()) for ln in f if ln.strip() and not ln.startswith("#")]
    raise FileNotFoundError(f"{images}: neither a folder of images nor a text file listing images")


def collection_graph(coll: Collection, *, top_k: int, threshold: float, sigma: float, min_weight: float,
                     candidates: int = 0, third_pairs: bool = True):
    """Steps 2-4: returns (vertices, adjacency, pair predictions, stats)."""
    t = time.time()
    graph_pairs = coll.neighbour_pairs(top_k, candidates)
    stats = {"seconds_scores": round(time.time() - t, 2)}
    need = np.concatenate([graph_pairs, closing_pairs(graph_pairs)]) if third_pairs else graph_pairs
    t = time.time()
    preds = coll.pair_predictions(need)
    stats["seconds_pairs"] = round(time.time() - t, 2)
    ids = preds.lookup(graph_pairs[:, 0], graph_pairs[:, 1])
    verts = extract_vertices(preds, ids, threshold)
    t = time.time()
    adj, gstats = build_graph(verts, preds, sigma=sigma, min_weight=min_weight)
    stats.update(gstats, graph_pairs=int(len(graph_pairs)), predicted_pairs=int(len(preds.pairs)),
                 seconds_graph=round(time.time() - t, 2))
    return verts, adj, preds, stats


def cluster_regions(verts, labels: np.ndarray, names: list[str], sizes: dict[int, tuple[int, int]],
                    grid: tuple[int, int]) -> list[dict]:
    """Clusters as {"id", "n_vertices", "n_images", "weight", "regions": [{"image", "box", "n_points"}]}."""
    h, w = grid
    out = []
    for c in np.unique(labels[labels >= 0]):
        sel = np.flatnonzero(labels == c)
        imgs = np.concatenate([verts.img[sel, 0], verts.img[sel, 1]])
        pos = np.concatenate([verts.pos[sel, :2], verts.pos[sel, 2:]])
        regions = []
        for im in np.unique(imgs):
            p = pos[imgs == im]
            col = np.clip(np.floor(p[:, 0]), 0, w - 1)
            row = np.clip(np.floor(p[:, 1]), 0, h - 1)
            W, H = sizes[int(im)]
            box = [float(col.min() * W / w), float(row.min() * H / h), float((col.max() + 1) * W / w),
                   float((row.max() + 1) * H / h)]
            regions.append({"image": names[int(im)], "box": [round(v, 1) for v in box], "n_points": int(len(p))})
        regions.sort(key=lambda r: -r["n_points"])
        out.append({"id": int(c), "n_vertices": int(len(sel)), "n_images": len(regions),
                    "weight": round(float(verts.mask[sel].sum()), 3), "regions": regions})
    out.sort(key=lambda c: (-c["n_images"], -c["weight"]))
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="segswap-discover", parents=[model_parser()],
                                description="Discover repeated regions in an image collection (paper §5).")
    p.add_argument("images", help="folder of images, or a text file listing image paths")
    p.add_argument("--out", required=True, help="output folder (clusters.json, sheets/, work/)")
    p.add_argument("--size", type=int, default=DEFAULTS["size"], help="images are resized to SIZE x SIZE (640)")
    p.add_argument("--top-k", type=int, default=DEFAULTS["top_k"], help="pairs per image in the graph (5)")
    p.add_argument("--candidates", type=int, default=0,
                   help="score each image only against its N nearest by mean-pooled features (0: all pairs)")
    p.add_argument("--threshold", type=float, default=DEFAULTS["threshold"], help="mask threshold for vertices (0.5)")
    p.add_argument("--sigma", type=float, default=DEFAULTS["sigma"], help="Eq. 4 sigma, in grid cells (1.0)")
    p.add_argument("--min-weight", type=float, default=DEFAULTS["min_weight"], help="drop lighter edges (0.01)")
    p.add_argument("--no-third-pairs", action="store_true",
                   help="do not predict the third pairs of Eq. 4 (edges needing them are skipped)")
    p.add_argument("--n-eig", type=int, default=DEFAULTS["n_eig"], help="eigenvectors (100)")
    p.add_argument("--clusters", type=int, default=DEFAULTS["clusters"], help="K-means clusters (500)")
    p.add_argument("--eigen-solver", default="components", choices=["components", "eigsh"],
                   help="exact per connected component (default) or ARPACK on the whole matrix")
    p.add_argument("--raw-adjacency", action="store_true", help="eigenvectors of A instead of D^-1/2 A D^-1/2")
    p.add_argument("--sheets", type=int, default=50, help="contact sheets for the top N clusters (50)")
    p.add_argument("--min-images", type=int, default=2, help="report clusters spanning at least N images (2)")
    p.add_argument("--seed", type=int, default=0)
    add_version(p)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(level=args.log_level)
    try:
        return run(args)
    except (FileNotFoundError, ValueError) as e:  # bad input: the message names the file
        print(f"segswap-discover: error: {e}", file=sys.stderr)
        return 2


def run(args) -> int:
    from segswap.apps.cli_common import load

    paths = read_image_arg(args.images)
    if len(paths) < 3:
        raise ValueError(f"{args.images}: discovery needs at least 3 images, found {len(paths)}")
    model, cache = load(args)
    os.makedirs(args.out, exist_ok=True)
    if args.feature_cache is None:
        cache.cache_dir = os.path.join(args.out, "work", "features")
        os.makedirs(cache.cache_dir, exist_ok=True)
    size = (args.size, args.size)
    paths, bad = usable_images(cache, paths, size)
    for msg in bad:
        log.warning("skipped: %s", msg)
    if len(paths) < 3:
        raise ValueError(f"{args.images}: fewer than 3 readable images ({len(bad)} unreadable)")
    coll = Collection(model, paths, size, os.path.join(args.out, "work"), cache, batch_size=args.batch_size)
    verts, adj, preds, stats = collection_graph(coll, top_k=args.top_k, threshold=args.threshold, sigma=args.sigma,
                                                min_weight=args.min_weight, candidates=args.candidates,
                                                third_pairs=not args.no_third_pairs)
    log.info("graph: %d vertices, %d edges", stats["vertices"], stats["edges"])
    labels = np.full(len(verts), -1, np.int64)
    connected = np.flatnonzero(np.asarray(adj.getnnz(axis=1)) > 0)
    t = time.time()
    if len(connected) >= 2:
        sub = adj[connected][:, connected]
        emb = spectral_embedding(sub, args.n_eig, normalise=not args.raw_adjacency, method=args.eigen_solver,
                                 seed=args.seed)
        stats["seconds_eigen"] = round(time.time() - t, 2)
        t = time.time()
        labels[connected] = kmeans(emb, args.clusters, seed=args.seed)
        stats["seconds_kmeans"] = round(time.time() - t, 2)
    names = [os.path.relpath(p, args.images) if os.path.isdir(args.images) else p for p in paths]
    used = np.unique(verts.img[labels >= 0]) if len(verts) else np.zeros(0, int)
    sizes = {}
    for i in used:
        with Image.open(paths[int(i)]) as im:
            sizes[int(i)] = im.size
    clusters = [c for c in cluster_regions(verts, labels, names, sizes, preds.grid) if c["n_images"] >= args.min_images]
    os.makedirs(os.path.join(args.out, "sheets"), exist_ok=True)
    by_name = dict(zip(names, paths))
    for rank, c in enumerate(clusters[:args.sheets]):
        c["sheet"] = f"sheets/cluster_{rank:04d}.png"
        write_sheet(os.path.join(args.out, c["sheet"]), c["regions"], by_name)
    config = {k: v for k, v in vars(args).items() if k not in ("log_level",)}
    write_json(os.path.join(args.out, "clusters.json"),
               {"config": config, "stats": stats, "n_images": len(paths), "skipped_images": bad,
                "clusters": clusters})
    print(f"{len(paths)} images, {stats['vertices']} correspondences, {stats['edges']} edges, "
          f"{len(clusters)} clusters spanning >= {args.min_images} images -> {args.out}/clusters.json")
    for c in clusters[:10]:
        print(f"  cluster {c['id']:4d}: {c['n_images']:3d} images, {c['n_vertices']:5d} correspondences"
              + (f", {c['sheet']}" if "sheet" in c else ""))
    return 0


if __name__ == "__main__":
    logging.getLogger().setLevel(logging.INFO)
    raise SystemExit(main())
