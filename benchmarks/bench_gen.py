"""Generation cost in CPU-seconds (user + sys) per pair, by stage, against the official generator's steps.

    python benchmarks/bench_gen.py [--pairs 20] [--size 480] [--skip-ray] [--skip-scaling] [--images DIR]

CPU time, not wall time: it is what a user pays on a cluster, and it is steadier than wall time on a
shared machine (the load average is printed before each section). Everything runs side by side in one
process on the default corpus (unsupervised segments of the embedded scikit-image photos, extracted once
beforehand) with the command's defaults, and prints figures and ratios only:

1. per setting (style none/magenta x blend none/cv2/multigrid, none/pyamg, the former default, and
   magenta@0.5/multigrid, the default with ``--style-scale 0.5``),
   CPU-s per pair written and per stage:
   decode (image files, on the renderer's cache misses), segments (draws, mask decoding, resizing,
   context masks), geometry (transforms, dense warp maps),
   ground truth (ownership, masks, flows), blend (warp + blend, also per paste), style (per image too),
   encode (JPEG/PNG/npy/json into a shard tar); skipped draws are included (they are part of the job);
2. the same pairs through ``official_reference.py`` (the official generator's CPU steps: mask, 20-iteration
   dilation, resizes/rotation, one seamlessClone per paste, JPEG writes) and the ratio of each setting to it;
3. one synthetic blend of ~83k unknowns per method, as a ratio to cv2.seamlessClone and against the
   direct solve (mean and max grey-level difference, share of pixels that differ);
4. the cost per pixel of the default command (and of style none + cv2) at 240, 480 and 960 px;
5. Ray: 1 and 2 workers, pairs per worker CPU-second (generation only) and the 2-vs-1 efficiency;
   ray.init and each worker's start-up (process boot + imports before its first shard, then building
   the renderer and styliser) reported separately; peak RSS per worker.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import Counter

import cv2
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from official_reference import reference_pair  # noqa: E402

from segswap.core.cputime import cpu_seconds  # noqa: E402
from segswap.pipeline import blend as blending  # noqa: E402
from segswap.pipeline.config import get_parser, resolve  # noqa: E402
from segswap.pipeline.groundtruth import SkipPair  # noqa: E402
from segswap.pipeline.render import RENDER_DEFAULTS, RENDER_STAGES, PairRenderer  # noqa: E402
from segswap.pipeline.run import generate  # noqa: E402
from segswap.pipeline.style import build_styliser  # noqa: E402
from segswap.segments.coco import SegmentIndex  # noqa: E402
from segswap.shards.format import sample_key  # noqa: E402
from segswap.shards.writer import ShardWriter  # noqa: E402

STAGES = (*RENDER_STAGES, "style", "encode")
# "magenta@0.5": the built-in styles at --style-scale 0.5 (the styliser's default is 2/3); "magenta:onnxruntime":
# with --style-engine onnxruntime (what the default runs on a CPU without native bfloat16).
SETTINGS = (("none", "none"), ("none", "cv2"), ("none", "multigrid"), ("none", "pyamg"), ("magenta", "cv2"),
            ("magenta", "multigrid"), ("magenta:onnxruntime", "multigrid"), ("magenta@0.5", "multigrid"))
DEFAULT_SETTING = ("magenta", "multigrid")


def load() -> str:
    return "load average %.2f %.2f %.2f" % os.getloadavg()


def _cfg(argv: list[str]) -> dict:
    return resolve(vars(get_parser().parse_args(argv)))


def prepare_corpus(cache: str, images: str | None) -> list[str]:
    """Segment the corpus once (the default path: unsupervised segments of the embedded photos)."""
    argv = ["--out", cache, "--shard-range", "0:0", "--workers", "0"]
    if images:
        argv += ["--images", images]
    generate(_cfg(argv))
    images = images or os.path.join(cache, "embedded-images")
    return ["--segments", "coco", "--coco-annotations", os.path.join(cache, "segments.json"), "--images", images]


def styliser_for(style: str):
    """The styliser of a setting's style, spelled ``NAME[@SCALE][:ENGINE]``."""
    rest, _, engine = style.partition(":")
    name, _, scale = rest.partition("@")
    return build_styliser(name, work_scale=float(scale) if scale else None, engine=engine or None)


def run_setting(index: SegmentIndex, style: str, blend: str, pairs: int, size: int, style_batch: int, seed: int = 1):
    """Render, stylise and encode ``pairs`` pairs; returns (pairs, CPU-s per stage, pastes, attempts,
    renderer, styliser)."""
    renderer = PairRenderer(index, None, **{**RENDER_DEFAULTS, "blend": blend, "size": size})
    styliser = styliser_for(style)
    for i in range(3):  # warm-up: image cache, lazy imports, ONNX session
        try:
            p = renderer.render_pair(np.random.default_rng([seed, 10 ** 6 + i]), "warm")
            if styliser is not None:
                styliser.stylise([p.img0, p.img1], np.random.default_rng(0))
        except SkipPair:
            pass
    renderer.stage_cpu.clear()
    cost, done, attempts = Counter(), [], 0
    with tempfile.TemporaryDirectory() as tmp, ShardWriter(os.path.join(tmp, "bench.tar")) as writer:
        while len(done) < pairs:
            batch = []
            while len(batch) < style_batch and len(done) + len(batch) < pairs:
                attempts += 1
                try:
                    batch.append(renderer.render_pair(np.random.default_rng([seed, attempts]),
                                                      sample_key(0, len(done) + len(batch))))
                except SkipPair:
                    continue
            if styliser is not None:
                with cpu_seconds(cost, "style"):
                    styled, _ = styliser.stylise([im for p in batch for im in (p.img0, p.img1)], np.random.default_rng(0))
                for i, p in enumerate(batch):
                    p.sty0, p.sty1 = styled[2 * i], styled[2 * i + 1]
            with cpu_seconds(cost, "encode"):
                for p in batch:
                    writer.write(p)
            done.extend(batch)
    cost.update(renderer.stage_cpu)
    pastes = sum(len(p.meta["segments"]) for p in done)
    return done, cost, pastes, attempts, renderer, styliser


def run_reference(renderer: PairRenderer, done: list, size: int) -> float:
    """CPU-s per pair of official_reference.py on the same images and segments as ``done``."""
    index = renderer.segments
    by_id = {s.id: s for s in index.segments}
    bgs = {(b.file_name, b.id if b.id >= 0 else None): b for b in renderer.backgrounds}
    cpu = Counter()
    with tempfile.TemporaryDirectory() as tmp:
        for n, p in enumerate(done):
            meta = p.meta
            source = renderer._load(index.images[meta["source"]["id"]])  # decoded outside the timing, as segswap's cache
            background = renderer._load(bgs[(meta["background"]["file_name"], meta["background"]["id"])])
            segs = [by_id[s["id"]] for s in meta["segments"]]
            cells = [tuple(int(v) for v in s["cell"]) for s in meta["segments"]]
            with cpu_seconds(cpu, "ref"):
                masks = [index.decode_mask(s) for s in segs]
                reference_pair(np.random.default_rng(n), source, background, masks, tmp, f"p{n}", size, cells,
                               meta["segments"])
    return cpu["ref"] / len(done)


def bench_stages(index, pairs: int, size: int, style_batch: int) -> dict:
    print(f"\n== CPU-s per pair at {size}x{size}, {pairs} pairs per setting, one worker in-process ({load()})")
    header = "".join(f"{s:>13}" for s in STAGES)
    print("  /ref: total less decode (the reference is handed decoded images) over official_reference.py on the "
          "same pairs, run just after")
    print(f"{'style/blend':>30}{header}{'total':>9}{'/ref':>7}  per paste (blend)  per image (style)  attempts")
    rows, refs, engines = {}, [], {}
    for style, blend in SETTINGS:
        done, cost, pastes, attempts, renderer, styliser = run_setting(index, style, blend, pairs, size, style_batch)
        if styliser is not None:
            engines[style] = styliser.engine
        n = len(done)
        total = sum(cost.values()) / n
        # The same pairs (same draws in every setting) through the reference right after, so the
        # ratio compares runs a few seconds apart on a machine whose load drifts.
        ref = run_reference(renderer, done, size)
        refs.append(ref)
        rows[(style, blend)] = (total, cost, n, pastes)
        cells = "".join(f"{cost[s] / n:13.4f}" for s in STAGES)
        style_img = f"{cost['style'] / (2 * n):.4f}" if style != "none" else "-"
        print(f"{style + '/' + blend:>30}{cells}{total:9.4f}{(total - cost['decode'] / n) / ref:7.2f}  "
              f"{cost['blend'] / pastes:.4f}"
              f"{'':12}{style_img:>8}{'':11}{attempts}")
    print(f"{'reference':>30}{'':>{13 * len(STAGES)}}{statistics.median(refs):9.4f}{1:7.2f}  (official_reference.py, "
          f"same images and segments; median of its {len(refs)} runs, one after each setting: "
          f"{', '.join(f'{r:.4f}' for r in refs)})")
    print("what ran the 26-style network: " + ", ".join(f"{style} {engine}" for style, engine in engines.items()))
    per_paste = {blend: rows[("none", blend)][1]["blend"] / rows[("none", blend)][3] for blend in ("cv2", "multigrid", "pyamg")}
    print(f"blend per paste (warp + blend), multigrid / cv2 on the same pastes: "
          f"{per_paste['multigrid'] / per_paste['cv2']:.2f}, pyamg / cv2: {per_paste['pyamg'] / per_paste['cv2']:.2f}")
    return {"rows": rows, "reference": refs}


def blend_inputs(size: int = 480, seed: int = 0):
    rng = np.random.default_rng(seed)
    src = cv2.resize(rng.uniform(0, 255, (12, 12, 3)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
    dst = cv2.resize(rng.uniform(0, 255, (9, 9, 3)).astype(np.float32), (size, size), interpolation=cv2.INTER_CUBIC)
    src = np.clip(src + rng.normal(0, 10, src.shape), 0, 255).astype(np.uint8)
    dst = np.clip(dst + rng.normal(0, 10, dst.shape), 0, 255).astype(np.uint8)
    mask = np.zeros((size, size), np.uint8)
    cv2.ellipse(mask, (size // 2, size // 2), (int(size * 0.38), int(size * 0.3)), 20, 0, 360, 1, -1)
    return src, dst, mask


def bench_blend(repeats: int = 3) -> None:
    src, dst, mask = blend_inputs()
    print(f"\n== one blend at 480x480, {int(mask.sum())} unknowns per channel, CPU-s, min of {repeats} ({load()})")
    times, outs = {}, {}
    blending.blend("multigrid", src, dst, mask)  # compile or load the numba kernels outside the timing
    for method in ("cv2", "multigrid", "pyamg", "direct"):
        runs = []
        for _ in range(repeats if method != "direct" else 1):
            t = time.process_time()
            outs[method] = blending.blend(method, src, dst, mask)
            runs.append(time.process_time() - t)
        times[method] = min(runs)
    ref = outs["direct"].astype(np.float32)
    inside = mask > 0
    for method, t in times.items():
        diff = np.abs(outs[method].astype(np.float32) - ref)[inside]
        print(f"{method:>9}: {t:.4f} CPU-s  ({t / times['cv2']:.2f} x cv2.seamlessClone); vs the direct solve: "
              f"mean |diff| {diff.mean():.2f}, max {diff.max():.0f} grey levels, {100 * (diff > 0).mean():.3f}% of "
              f"pixels differ")


def bench_scaling(index, pairs: int, style_batch: int) -> None:
    print(f"\n== cost per pixel, {pairs} pairs per size ({load()})")
    for style, blend in (DEFAULT_SETTING, ("none", "cv2")):
        per_px, per_px_no_decode = {}, {}
        for size in (240, 480, 960):
            done, cost, *_ = run_setting(index, style, blend, pairs, size, style_batch)
            total = sum(cost.values()) / len(done)
            per_px[size] = total / size ** 2
            per_px_no_decode[size] = (total - cost["decode"] / len(done)) / size ** 2
            stages = ", ".join(f"{s} {cost[s] / len(done) / size ** 2 * 1e9:.0f}" for s in STAGES if cost[s])
            print(f"{style}/{blend} {size:>4} px: {total:.4f} CPU-s per pair = {per_px[size] * 1e9:.0f} ns/px "
                  f"({stages})")
        print(f"{style}/{blend}: max/min cost per pixel over 240-960 px = {max(per_px.values()) / min(per_px.values()):.2f}"
              f"; without decoding the source files (a cost per file, not per pixel) "
              f"{max(per_px_no_decode.values()) / min(per_px_no_decode.values()):.2f}")


def bench_ray(corpus: list[str], pairs: int, size: int) -> None:
    import ray

    print(f"\n== Ray, default command (magenta, multigrid), {pairs} pairs per run ({load()})")
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    rates = {}
    for workers in (1, 2):
        wall, cpu = time.perf_counter(), time.process_time()
        ray.init(num_cpus=workers, include_dashboard=False, _node_ip_address="127.0.0.1", configure_logging=False)
        print(f"ray x{workers}: ray.init {time.perf_counter() - wall:.2f} s wall, {time.process_time() - cpu:.2f} "
              "CPU-s in the driver")
        try:
            n_shards = 2 * workers
            with tempfile.TemporaryDirectory() as out:
                generate(_cfg([*corpus, "--out", out, "--num-shards", str(n_shards), "--pairs-per-shard",
                               str(max(1, pairs // n_shards)), "--size", str(size), "--workers", str(workers),
                               "--seed", "0"]))
                parts_dir = os.path.join(out, "manifests")
                shards = [s for n in sorted(os.listdir(parts_dir))
                          for s in json.load(open(os.path.join(parts_dir, n)))["shards"].values()]
        finally:
            ray.shutdown()
        by_pid: dict = {}
        for s in shards:
            by_pid.setdefault(s["pid"], []).append(s)
        gen_cpu = sum(s["cpu_s"] - s["setup_cpu_s"] for s in shards)
        n_pairs = sum(s["pairs"] for s in shards)
        rates[workers] = n_pairs / gen_cpu
        for pid, ss in sorted(by_pid.items()):
            first = min(ss, key=lambda s: s["process_cpu_at_start_s"])
            print(f"  worker {pid}: start-up {first['process_cpu_at_start_s']:.2f} CPU-s (boot + imports) + "
                  f"{first['setup_cpu_s']:.2f} CPU-s (renderer, styliser); {sum(s['pairs'] for s in ss)} pairs in "
                  f"{sum(s['cpu_s'] - s['setup_cpu_s'] for s in ss):.2f} CPU-s; peak RSS "
                  f"{max(s['peak_rss_mb'] for s in ss):.0f} MiB")
        print(f"ray x{workers}: {n_pairs} pairs, {rates[workers]:.2f} pairs per worker CPU-second (generation only)")
    print(f"efficiency, pairs per CPU-second with 2 workers / 1 worker: {rates[2] / rates[1]:.2f}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pairs", type=int, default=20)
    p.add_argument("--size", type=int, default=480)
    p.add_argument("--style-batch", type=int, default=8, help="pairs stylised together (the command's default)")
    p.add_argument("--scaling-pairs", type=int, default=20, help="pairs per size (6 moved the 240-px figure by 20%%)")
    p.add_argument("--skip-ray", action="store_true")
    p.add_argument("--skip-scaling", action="store_true")
    p.add_argument("--images", help="image folder to benchmark on (default: the embedded photos)")
    p.add_argument("--corpus", help="folder holding an earlier run's segments (kept between runs)")
    args = p.parse_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING)
    print(f"cpus: {os.cpu_count()}, python {sys.version.split()[0]}, opencv {cv2.__version__}, {load()}")
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.corpus or tmp
        if os.path.exists(os.path.join(cache, "segments.json")):
            images = args.images or os.path.join(cache, "embedded-images")
            corpus = ["--segments", "coco", "--coco-annotations", os.path.join(cache, "segments.json"), "--images", images]
        else:
            corpus = prepare_corpus(cache, args.images)
        index = SegmentIndex.from_coco(corpus[3], corpus[5])
        bench_stages(index, args.pairs, args.size, args.style_batch)
        bench_blend()
        if not args.skip_scaling:
            bench_scaling(index, args.scaling_pairs, args.style_batch)
        if not args.skip_ray:
            bench_ray(corpus, args.pairs, args.size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
