"""``segswap-adain-train``: train an AdaIN decoder on your content and style folders (pytorch-AdaIN recipe).

The paper's styliser is an AdaIN model trained on Brueghel paintings. Given the normalised VGG-19
(``vgg_normalised.pth``), this trains the 29-module decoder as pytorch-AdaIN's ``train.py`` does:

- each step draws ``--batch-size`` (8) content and style images, resizes them to ``--load-size`` square
  (512) and takes a random ``--crop`` (256) crop;
- ``t = AdaIN(f_c, f_s)`` at relu4_1, ``g = decoder(t)``;
- content loss ``MSE(relu4_1(g), t)``; style loss ``Σ MSE(μ(φ_i(g)), μ(φ_i(s))) + MSE(σ(φ_i(g)), σ(φ_i(s)))``
  over relu1_1, relu2_1, relu3_1, relu4_1; total = ``--content-weight`` (1) · content + ``--style-weight``
  (10) · style;
- Adam, lr ``--lr`` (1e-4) decayed as ``lr / (1 + --lr-decay · step)`` (5e-5), ``--iters`` (160000) steps.

The output folder is a run directory: ``checkpoint.pth`` (decoder, optimiser, step, config; written
atomically every ``--save-every`` steps, at the end and on Ctrl-C), ``decoder.pth`` (the decoder alone,
in the public layout), a link or copy of ``vgg_normalised.pth`` (so the folder is directly usable as
``segswap-gen --style adain --adain-weights OUT``), ``train_config.json`` and ``samples/step_NNNNNNN.png``
(rows: content, style, output of a fixed sample batch). Running the same command again resumes from
``checkpoint.pth`` (``--no-resume`` starts over).

Every random choice (decoder init, images, crops) comes from ``--seed``: the batch of step ``s`` is drawn
from ``SeedSequence([seed, s])``, so a resumed run sees the same batches as an uninterrupted one, and a CPU
run is bitwise reproducible. Unreadable images are logged, counted and replaced by the next file.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from segswap.core.atomic import atomic_save, atomic_write_json
from segswap.core.cli import DEVICE_HELP, EXIT_USAGE, LOADER_WORKERS_HELP, add_version
from segswap.core.images import write_png
from segswap.core.listing import IMAGE_EXTENSIONS
from segswap.core.listing import list_images as list_image_files
from segswap.nets.adain import AdaIN, adain, build_decoder, calc_mean_std, load_decoder
from segswap.nets.device import available_cpus, resolve_device
from segswap.nets.vgg import WeightsFileError, load_vgg_encoder

log = logging.getLogger("segswap.adain_train")

CHECKPOINT = "checkpoint.pth"
DECODER = "decoder.pth"
VGG = "vgg_normalised.pth"
NUM_SAMPLE_IMAGES = 4
# Options whose change on resume would make the result a different experiment.
RESUME_MUST_MATCH = ("batch_size", "crop", "load_size", "content_weight", "style_weight", "lr", "lr_decay", "seed")


def get_args_parser(add_help: bool = True) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser("segswap-adain-train", add_help=add_help,
                                description="Train an AdaIN decoder (pytorch-AdaIN recipe) on a content and a style folder.")
    p.add_argument("--content-dir", required=True, help="folder of content photos (searched recursively)")
    p.add_argument("--style-dir", required=True, help="folder of style images, e.g. paintings (searched recursively)")
    p.add_argument("--vgg", required=True, help="vgg_normalised.pth (pytorch-AdaIN layout)")
    p.add_argument("--out", required=True, help="run folder: checkpoint, decoder.pth, samples")
    p.add_argument("--iters", type=int, default=160_000, help="training steps (default 160000)")
    p.add_argument("--batch-size", type=int, default=8, help="content/style images per step (default 8)")
    p.add_argument("--crop", type=int, default=256, help="random crop side (default 256)")
    p.add_argument("--load-size", type=int, default=512, help="images are resized to this square first (default 512)")
    p.add_argument("--lr", type=float, default=1e-4, help="Adam learning rate (default 1e-4)")
    p.add_argument("--lr-decay", type=float, default=5e-5, help="lr / (1 + decay * step) (default 5e-5)")
    p.add_argument("--content-weight", type=float, default=1.0, help="content loss weight (default 1)")
    p.add_argument("--style-weight", type=float, default=10.0, help="style loss weight (default 10)")
    p.add_argument("--seed", type=int, default=0, help="root seed of every random choice (default 0)")
    p.add_argument("--device", default="auto", help=DEVICE_HELP)
    p.add_argument("--workers", type=int, default=min(4, available_cpus()), help=LOADER_WORKERS_HELP)
    add_version(p)
    p.add_argument("--save-every", type=int, default=10_000, help="checkpoint every N steps (default 10000)")
    p.add_argument("--sample-every", type=int, default=1_000, help="sample PNG every N steps (default 1000)")
    p.add_argument("--log-every", type=int, default=100, help="log line every N steps (default 100)")
    p.add_argument("--init-decoder", default=None,
                   help="start from this decoder.pth (e.g. the public one) instead of a random decoder")
    p.add_argument("--no-resume", dest="resume", action="store_false",
                   help="ignore an existing checkpoint in --out and start over")
    return p


def list_images(root: str | os.PathLike, what: str) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        raise SystemExit(f"error: {root}: {what} folder not found")
    listing = list_image_files(root)
    for path, reason in listing.skipped:
        log.warning("skipped %s: %s", path, reason)
    files = listing.files
    if not files:
        raise SystemExit(f"error: {root}: no images in the {what} folder (looked for {', '.join(IMAGE_EXTENSIONS)})")
    return files


class CropBatches(Dataset):
    """Item ``step`` = (content [B,3,c,c], style [B,3,c,c], number of unreadable files met) in [0, 1].

    The files and crops of a step depend only on ``(seed, step)``, whatever the worker.
    """

    def __init__(self, content: list[Path], style: list[Path], batch_size: int, load_size: int, crop: int,
                 seed: int, num_steps: int):
        self.content, self.style = content, style
        self.batch_size, self.load_size, self.crop = batch_size, load_size, crop
        self.seed, self.num_steps = seed, num_steps
        self._warned: set[Path] = set()

    def __len__(self) -> int:
        return self.num_steps

    def _load(self, files: list[Path], index: int, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        from segswap.core.images import BadImage, load_rgb

        for tries in range(len(files)):
            path = files[(index + tries) % len(files)]
            try:
                image = load_rgb(path)
            except BadImage as e:
                if path not in self._warned:
                    self._warned.add(path)
                    log.warning("skipping unreadable image %s", e)
                continue
            image = cv2.resize(image, (self.load_size, self.load_size), interpolation=cv2.INTER_AREA
                               if min(image.shape[:2]) > self.load_size else cv2.INTER_LINEAR)
            top, left = rng.integers(self.load_size - self.crop + 1, size=2)
            return image[top:top + self.crop, left:left + self.crop], tries
        raise RuntimeError(f"none of the {len(files)} images in {files[0].parent} can be read")

    def batch(self, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, int]:
        bad = 0
        out = []
        for files in (self.content, self.style):
            images = []
            for index in rng.integers(len(files), size=self.batch_size):
                image, skipped = self._load(files, int(index), rng)
                images.append(image)
                bad += skipped
            x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div_(255.0)
            out.append(x)
        return out[0], out[1], bad

    def __getitem__(self, step: int):
        return self.batch(np.random.default_rng(np.random.SeedSequence([self.seed, step])))


def init_decoder(generator: torch.Generator) -> torch.nn.Sequential:
    """A decoder with PyTorch's default conv init, drawn from ``generator`` (never the global RNG)."""
    decoder = build_decoder()
    for m in decoder.modules():
        if isinstance(m, torch.nn.Conv2d):
            torch.nn.init.kaiming_uniform_(m.weight, a=math.sqrt(5), generator=generator)
            bound = 1 / math.sqrt(m.weight[0].numel())
            torch.nn.init.uniform_(m.bias, -bound, bound, generator=generator)
    return decoder


def adain_losses(model: AdaIN, content: torch.Tensor, style: torch.Tensor) -> tuple[dict, torch.Tensor]:
    """The pytorch-AdaIN losses (content, style) and the decoded images."""
    with torch.no_grad():
        style_feats = model.encode_with_intermediate(style)
        t = adain(model.encode(content), style_feats[-1])
    out = model.decoder(t)
    out_feats = model.encode_with_intermediate(out)
    content_loss = F.mse_loss(out_feats[-1], t)
    style_loss = out.new_zeros(())
    for g, s in zip(out_feats, style_feats):
        g_mean, g_std = calc_mean_std(g)
        s_mean, s_std = calc_mean_std(s)
        style_loss = style_loss + F.mse_loss(g_mean, s_mean) + F.mse_loss(g_std, s_std)
    return {"content": content_loss, "style": style_loss}, out


def atomic_torch_save(obj, path: Path) -> None:
    atomic_save(path, lambda tmp: torch.save(obj, tmp))


def link_vgg(vgg: Path, out: Path) -> None:
    """Put vgg_normalised.pth beside decoder.pth so ``--adain-weights OUT`` works as is."""
    target = out / VGG
    if target.exists():
        return
    tmp = out / (VGG + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(vgg, tmp)
    except OSError:  # another filesystem, or links not allowed
        shutil.copyfile(vgg, tmp)
    os.replace(tmp, target)


def check_args(args) -> None:
    for name in ("iters", "batch_size", "crop", "load_size", "save_every", "sample_every", "log_every"):
        if getattr(args, name) < 1:
            raise SystemExit(f"error: --{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.crop > args.load_size:
        raise SystemExit(f"error: --crop {args.crop} is larger than --load-size {args.load_size}")
    if args.crop < 16:
        raise SystemExit("error: --crop must be at least 16 (relu4_1 is at stride 8 and needs 2x2 positions)")
    if args.workers < 0:
        raise SystemExit("error: --workers must be >= 0")


def train(args) -> Path:
    """Run (or resume) training; returns the path of the final ``decoder.pth``."""
    check_args(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "samples").mkdir(exist_ok=True)
    try:
        device = resolve_device(args.device)
    except ValueError as e:
        raise SystemExit(f"error: --device: {e}") from None
    content_files = list_images(args.content_dir, "content")
    style_files = list_images(args.style_dir, "style")
    log.info("%d content images in %s, %d style images in %s", len(content_files), args.content_dir,
             len(style_files), args.style_dir)
    config = {k: v for k, v in vars(args).items() if k not in ("resume",)}

    try:
        encoder = load_vgg_encoder(args.vgg)
        seeds = np.random.SeedSequence(args.seed).spawn(2)  # 0: decoder init, 1: the sample batch
        if args.init_decoder:
            decoder = load_decoder(args.init_decoder)
        else:
            decoder = init_decoder(torch.Generator().manual_seed(int(seeds[0].generate_state(1)[0])))
    except WeightsFileError as e:
        raise SystemExit(f"error: {e}") from None
    model = AdaIN(encoder, decoder).to(device).train()
    optimiser = torch.optim.Adam(model.decoder.parameters(), lr=args.lr)

    start = 0
    ckpt_path = out / CHECKPOINT
    if args.resume and ckpt_path.exists():
        try:
            ckpt = torch.load(ckpt_path, map_location=device, weights_only=True)
            model.decoder.load_state_dict(ckpt["decoder"])
            optimiser.load_state_dict(ckpt["optimiser"])
            start = int(ckpt["step"])
        except Exception as e:  # noqa: BLE001 - any unreadable checkpoint gets the same advice
            raise SystemExit(f"error: {ckpt_path}: cannot resume from this checkpoint ({type(e).__name__}: {e}); "
                             "use --no-resume to start over") from None
        changed = {k: (ckpt["config"].get(k), config[k]) for k in RESUME_MUST_MATCH if ckpt["config"].get(k) != config[k]}
        if changed:
            raise SystemExit(f"error: {ckpt_path} was trained with different options {changed} (checkpoint, now); "
                             "use the same options, another --out, or --no-resume")
        log.info("resuming from %s at step %d", ckpt_path, start)
    link_vgg(Path(args.vgg), out)
    atomic_write_json(out / "train_config.json", {
        **config, "resumed_from_step": start, "python": platform.python_version(), "torch": torch.__version__,
        "numpy": np.__version__, "command": sys.argv}, indent=2)

    data = CropBatches(content_files, style_files, args.batch_size, args.load_size, args.crop, args.seed, args.iters)
    sample_content, sample_style, _ = data.batch(np.random.default_rng(seeds[1]))
    sample_content = sample_content[:NUM_SAMPLE_IMAGES].to(device)
    sample_style = sample_style[:NUM_SAMPLE_IMAGES].to(device)

    def save_checkpoint(step: int) -> None:
        atomic_torch_save({"decoder": model.decoder.state_dict(), "optimiser": optimiser.state_dict(),
                           "step": step, "config": config}, ckpt_path)
        atomic_torch_save(model.decoder.state_dict(), out / DECODER)
        log.info("step %d: saved %s and %s", step, ckpt_path, out / DECODER)

    def save_sample(step: int) -> None:
        model.eval()
        with torch.no_grad():
            y = model(sample_content, sample_style).clamp(0, 1)
        model.train()
        rows = [torch.cat(list(x), dim=2) for x in (sample_content, sample_style, y)]
        grid = (torch.cat(rows, dim=1).permute(1, 2, 0) * 255 + 0.5).to(torch.uint8).cpu().numpy()
        write_png(out / "samples" / f"step_{step:07d}.png", grid)

    if start >= args.iters:
        log.info("already trained for %d steps (--iters %d): nothing to do", start, args.iters)
        if not (out / DECODER).exists():
            save_checkpoint(start)
        return out / DECODER

    loader = DataLoader(torch.utils.data.Subset(data, range(start, args.iters)), batch_size=None, shuffle=False,
                        num_workers=args.workers, persistent_workers=False)
    step = start
    bad_images = 0
    sums = {"content": 0.0, "style": 0.0}
    t_last, t_data = time.perf_counter(), 0.0
    t_fetch = time.perf_counter()
    try:
        for content, style, bad in loader:
            t_data += time.perf_counter() - t_fetch
            bad_images += int(bad)
            lr = args.lr / (1.0 + args.lr_decay * step)
            for group in optimiser.param_groups:
                group["lr"] = lr
            losses, _ = adain_losses(model, content.to(device, non_blocking=True), style.to(device, non_blocking=True))
            total = args.content_weight * losses["content"] + args.style_weight * losses["style"]
            if not torch.isfinite(total):
                raise FloatingPointError(f"step {step}: loss is {total.item()} (content {losses['content'].item()}, "
                                         f"style {losses['style'].item()}); lower --lr")
            optimiser.zero_grad(set_to_none=True)
            total.backward()
            optimiser.step()
            step += 1
            for k in sums:
                sums[k] += losses[k].item()
            if step % args.log_every == 0 or step == args.iters:
                n = (step - start) % args.log_every or args.log_every
                now = time.perf_counter()
                rate = n / (now - t_last)
                log.info("step %d/%d  content %.4f  style %.4f  lr %.2e  %.2f it/s  data %.0f%%  eta %s  "
                         "unreadable images %d", step, args.iters, sums["content"] / n, sums["style"] / n, lr, rate,
                         100 * t_data / (now - t_last), _duration((args.iters - step) / rate), bad_images)
                sums = dict.fromkeys(sums, 0.0)
                t_last, t_data = now, 0.0
            if step % args.sample_every == 0 or step == args.iters:
                save_sample(step)
            if step % args.save_every == 0 or step == args.iters:
                save_checkpoint(step)
            t_fetch = time.perf_counter()
    except KeyboardInterrupt:
        if step > start:
            save_checkpoint(step)
        log.warning("interrupted at step %d; run the same command again to resume", step)
        raise
    log.info("done: %d steps, decoder at %s (%d unreadable images skipped)", step, out / DECODER, bad_images)
    return out / DECODER


def _duration(seconds: float) -> str:
    seconds = int(max(seconds, 0))
    h, rem = divmod(seconds, 3600)
    return f"{h}:{rem // 60:02d}:{rem % 60:02d}"


def main(argv: list[str] | None = None) -> int:
    args = get_args_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S", stream=sys.stderr)
    try:
        train(args)
    except SystemExit as e:
        if not isinstance(e.code, str):
            raise
        print(e.code, file=sys.stderr)  # a user error, phrased as one line naming the file or option
        return EXIT_USAGE
    return 0


if __name__ == "__main__":
    sys.exit(main())
