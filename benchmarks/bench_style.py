"""Stylisation throughput and its share of pair generation.

    python benchmarks/bench_style.py [--images 8] [--size 480] [--threads 1] [--pairs 16] [--skip-gen]

Prints:
1. images/s and CPU-s per image (user + sys: what a cluster bills) at SIZE x SIZE on CPU with THREADS
   threads (one generator worker) for
   - magenta, built-in styles (multistyle26 at the default work scale 2/3, at full size, and with
     ``engine="onnxruntime"``),
   - magenta, style images (style prediction + 384 px transformer; painting vectors cached),
   - adain (random He-initialised weights in the public layout: timing only), paintings cached,
   each with batch_size 1 (one stylise() call per image) and 8 (one call per 8 images), after one
   warm-up call, and the batch-8 / batch-1 speed ratio;
2. the 26-style network alone (one onnxruntime thread) on a 2/3 x SIZE image (the default work size),
   as shipped, after each load-time edit of ``nets/magenta_graphs.py``, in the parts of
   ``nets/magenta_split.py`` (the path onnxruntime takes) and compiled by OpenVINO in float32 and in
   bfloat16 (``nets/magenta_openvino.py``, the default engine where bfloat16 is native), and the style-image
   transformer at its 384 px, batched as loaded and with its sub-pixel edit: CPU-s per image side by
   side (interleaved, best of 5 rounds), the ratio to the unedited graph and the largest output change;
3. the share of pair-generation time spent in style: ``segswap-gen`` in-process on the embedded corpus
   (--segments coco, the default blend), PAIRS pairs in one shard, with --style none vs each styliser,
   in process CPU time, share = (t_style - t_none) / t_style (set-up and model loading included, once
   per run; a first unmeasured run takes the process's one-off costs).
"""
from __future__ import annotations

import argparse
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import skimage.data
import torch

from segswap.nets.adain import build_decoder
from segswap.nets.vgg import build_vgg_normalised
from segswap.pipeline.style import build_styliser

PAINTINGS = ("coffee", "chelsea", "rocket", "astronaut")


def he_weights(module: torch.nn.Module, generator: torch.Generator) -> dict:
    sd = module.state_dict()
    for k, v in sd.items():
        sd[k] = (torch.randn(v.shape, generator=generator) * (2.0 / v[0].numel()) ** 0.5 if k.endswith("weight")
                 else torch.zeros(v.shape))
    return sd


def write_fixtures(root: Path) -> tuple[Path, Path]:
    paintings, weights = root / "paintings", root / "adain"
    paintings.mkdir()
    weights.mkdir()
    for name in PAINTINGS:
        cv2.imwrite(str(paintings / f"{name}.jpg"), getattr(skimage.data, name)()[..., ::-1])
    g = torch.Generator().manual_seed(0)
    torch.save(he_weights(build_vgg_normalised(), g), weights / "vgg_normalised.pth")
    torch.save(he_weights(build_decoder(), g), weights / "decoder.pth")
    return paintings, weights


def content_images(n: int, size: int) -> list[np.ndarray]:
    photos = [skimage.data.astronaut(), skimage.data.chelsea(), skimage.data.coffee(), skimage.data.rocket()]
    return [cv2.resize(photos[i % len(photos)], (size, size), interpolation=cv2.INTER_AREA) for i in range(n)]


def images_per_s(styliser, images: list[np.ndarray], batch: int) -> tuple[float, float]:
    """(images per wall-clock second, CPU-s per image)."""
    rng = np.random.default_rng(0)
    styliser.stylise(images[:batch], rng)  # warm-up: sessions, caches, allocator
    t, cpu = time.perf_counter(), time.process_time()
    for start in range(0, len(images), batch):
        styliser.stylise(images[start:start + batch], rng)
    return len(images) / (time.perf_counter() - t), (time.process_time() - cpu) / len(images)


def bench_throughput(n: int, size: int, paintings: Path, weights: Path) -> None:
    print(f"== stylisation throughput: {n} images at {size}x{size}, CPU, torch threads {torch.get_num_threads()}")
    images = content_images(n, size)
    from segswap.pipeline.style_magenta import MagentaStyliser

    setups = {
        "magenta builtin": lambda b: build_styliser("magenta", batch_size=b),
        "magenta builtin 1:1": lambda b: MagentaStyliser(batch_size=b, work_scale=1.0),
        "magenta builtin ort": lambda b: build_styliser("magenta", batch_size=b, engine="onnxruntime"),
        "magenta paintings": lambda b: build_styliser("magenta", style_images=str(paintings), batch_size=b),
        "adain paintings": lambda b: build_styliser("adain", style_images=str(paintings), adain_weights=str(weights),
                                                    batch_size=b, device="cpu"),
    }
    for name, make in setups.items():
        runs = {b: images_per_s(make(b), images, b) for b in (1, 8)}
        (r1, c1), (r8, c8) = runs[1], runs[8]
        print(f"{name:>20}: batch 1 {r1:.3f} images/s, {c1:.4f} CPU-s/image; batch 8 {r8:.3f} images/s, "
              f"{c8:.4f} CPU-s/image; batch 8 / batch 1 speed = {r8 / r1:.2f} (load {os.getloadavg()[0]:.1f})")


def _interleaved(sessions: dict, feed: dict, rounds: int, calls: int, reference: str) -> None:
    """CPU-s per call of each session (best of ``rounds``), its ratio to ``reference`` and the largest
    output change from it."""
    outputs = {k: s.run(None, feed)[0] for k, s in sessions.items()}  # warm-up
    best = dict.fromkeys(sessions, float("inf"))
    for _ in range(rounds):  # interleaved, so a drift of the machine's load hits every graph alike
        for name, sess in sessions.items():
            cpu = time.process_time()
            for _ in range(calls):
                sess.run(None, feed)
            best[name] = min(best[name], (time.process_time() - cpu) / calls)
    for name in sessions:
        change = float(np.abs(outputs[name] - outputs[reference]).max())
        print(f"{name:>20}: {best[name]:.4f} CPU-s/image, {best[name] / best[reference]:.2f}x {reference}, "
              f"max |output - {reference}| {change:.1e} (load {os.getloadavg()[0]:.1f})")


def bench_graph_edits(size: int, rounds: int = 5, calls: int = 4) -> None:
    import onnx
    import onnxruntime as ort

    from segswap.nets.magenta import MULTISTYLE_MODEL, TRANSFORM_MODEL, TRANSFORM_SIZE, default_model_dir
    from segswap.nets.magenta_graphs import dynamic_batch, fused_instance_norm, subpixel_convolutions
    from segswap.nets.magenta_openvino import OpenVINOSession, bf16_is_native
    from segswap.nets.magenta_split import SplitSession, split_at_first_norm

    work = round(size * 2 / 3) // 4 * 4
    print(f"== the 26-style network alone at {work}x{work} (work scale 2/3 of {size}), CPU-s per image; "
          f"bfloat16 native here: {bf16_is_native()}")
    raw = (default_model_dir() / MULTISTYLE_MODEL).read_bytes()
    fused = fused_instance_norm(onnx.load_model_from_string(raw))
    graphs = {"shipped": raw, "fused norms": fused.SerializeToString()}
    edited = subpixel_convolutions(fused)  # the edits change their model in place: serialised before
    graphs["fused + sub-pixel"] = edited.SerializeToString()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = 1, 1, 3
    sessions = {k: ort.InferenceSession(v, opts, providers=["CPUExecutionProvider"]) for k, v in graphs.items()}
    head, tail, cut = split_at_first_norm(edited)
    sessions["... + in two parts"] = SplitSession(
        *(ort.InferenceSession(p.SerializeToString(), opts, providers=["CPUExecutionProvider"]) for p in (head, tail)), cut)
    for precision in ("f32", "bf16"):  # the edited graph compiled by OpenVINO (bf16: the default on AMX)
        sessions[f"OpenVINO {precision}"] = OpenVINOSession(graphs["fused + sub-pixel"], precision=precision)
    image = content_images(1, work)[0]
    feed = {"image": np.ascontiguousarray((image.astype(np.float32) / 255).transpose(2, 0, 1)[None]),
            "style_weights": np.eye(26, dtype=np.float32)[5]}
    _interleaved(sessions, feed, rounds, calls, "shipped")

    print(f"== the style-image transformer alone at {TRANSFORM_SIZE}x{TRANSFORM_SIZE}, CPU-s per image")
    batched = dynamic_batch(onnx.load_model_from_string((default_model_dir() / TRANSFORM_MODEL).read_bytes()))
    graphs = {"shipped (batched)": batched.SerializeToString(),
              "sub-pixel": subpixel_convolutions(batched).SerializeToString()}
    sessions = {k: ort.InferenceSession(v, opts, providers=["CPUExecutionProvider"]) for k, v in graphs.items()}
    names = [i.name for i in next(iter(sessions.values())).get_inputs()]
    rng = np.random.default_rng(0)
    feed = dict(zip(names, [cv2.resize(image, (TRANSFORM_SIZE, TRANSFORM_SIZE))[None].astype(np.float32) / 255,
                            rng.normal(size=(1, 1, 1, 100)).astype(np.float32)]))
    _interleaved(sessions, feed, rounds, calls, "shipped (batched)")


def bench_share(pairs: int, size: int, paintings: Path, weights: Path) -> None:
    from segswap.pipeline.config import get_parser, resolve
    from segswap.pipeline.run import generate

    print(f"== share of generation time in style: {pairs} pairs at {size}x{size}, in-process, embedded corpus")
    runs = {"none": ["--style", "none"], "magenta builtin": ["--style", "magenta"],
            "magenta paintings": ["--style", "magenta", "--style-images", str(paintings)],
            "adain paintings": ["--style", "adain", "--style-images", str(paintings), "--adain-weights", str(weights)]}
    times = {}
    # A first, unmeasured run takes the one-off costs (numba kernels, lazy imports) off the first setting.
    for name, flags in [("warm-up", []), *runs.items()]:
        with tempfile.TemporaryDirectory() as out:
            cfg = resolve(vars(get_parser().parse_args([
                "--segments", "coco", "--out", out, "--num-shards", "1", "--pairs-per-shard", str(pairs),
                "--size", str(size), "--workers", "0", "--seed", "0", *flags])))
            cpu = time.process_time()
            summary = generate(cfg)
            cpu = time.process_time() - cpu
        if name == "warm-up":
            continue
        times[name] = cpu
        line = (f"{name:>18}: {summary['pairs_written']} pairs in {cpu:.2f} CPU-s ({cpu / pairs:.3f} CPU-s/pair, "
                "set-up included)")
        if name != "none":
            share = (times[name] - times["none"]) / times[name]
            line += f"; style = {100 * share:.0f}% of the CPU time"
        print(line)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=8, help="images per throughput measurement (default 8)")
    p.add_argument("--size", type=int, default=480)
    p.add_argument("--threads", type=int, default=1, help="torch threads (onnxruntime uses 1 per worker)")
    p.add_argument("--pairs", type=int, default=16, help="pairs per generation run (default 16)")
    p.add_argument("--skip-gen", action="store_true", help="only the throughput part")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"cpus: {os.cpu_count()}, load average {load:.1f}, python {sys.version.split()[0]}, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        paintings, weights = write_fixtures(Path(tmp))
        bench_throughput(args.images, args.size, paintings, weights)
        bench_graph_edits(args.size)
        if not args.skip_gen:
            bench_share(args.pairs, args.size, paintings, weights)
    return 0


if __name__ == "__main__":
    sys.exit(main())
