"""The training loop: streaming batches, Eq. 2 loss, optional hard negatives and pixel contrast, DDP, resume.

One process per device (``torchrun --nproc_per_node N`` for several; gloo on CPU, nccl on CUDA). The
frozen backbone runs outside DDP; only the head (and the pixel-contrast projection, when on) is
wrapped and synchronised. Each step:

1. ``batch_pos`` augmented positive pairs from the shard stream;
2. conv4 features of both images, L2-normalised, without gradients;
3. ``batch_neg`` in-batch negatives: image 0 of pair i with image 1 of pair (i + s) mod P, s = 1, 2, …
   (the paper's 5 + 15), plus ``batch_hard`` mined hard negatives in the ``hardneg`` phase, all run
   through the head in one forward together with the positives;
4. the named, weighted terms of :class:`~segswap.train.loss.TrainingCriterion` (Eq. 2, and ``contrast``
   when on), summed; Adam, warm-up/step lr.

Rank 0 owns the run directory: ``config.yaml``, ``run.json`` (seed, versions, git revision, command),
``train.log``, ``metrics.jsonl``, ``val.jsonl``, TensorBoard events (when tensorboard is installed),
``last.pth`` (atomic) and ``ckpt-%08d.pth``. A run whose directory holds ``last.pth`` resumes from it
(model, optimizer, lr schedule, step).

Stopping: SIGTERM / SIGINT end the run within moments whatever it is doing. While it waits for data
(or validates, or refills the hard-negative pool) the signal interrupts at once; during an optimiser
step it lets the step finish. ``last.pth`` is then saved if a step completed since the last save and
the process exits with 128 + the signal number; rerunning the command resumes. Loader workers exit on
the same signals (they hold nothing to save), die with the trainer (``PR_SET_PDEATHSIG``) and are
stopped by it on every way out, so an error in a worker ends the run instead of hanging it.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import signal
import socket
import sys
import time
from collections import defaultdict

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from segswap.core.atomic import atomic_write as _atomic_write
from segswap.core.provenance import git_revision as _git_rev
from segswap.core.provenance import package_versions as _versions
from segswap.nets.device import resolve_device
from segswap.train import config as config_mod
from segswap.train.augment import PairAugmenter
from segswap.train.checkpoint import init_weights, read_resume_checkpoint, save_checkpoint
from segswap.train.evaluate import validate, write_validation_sheet
from segswap.train.hardneg import HardNegativeMiner
from segswap.train.loss import TrainingCriterion, build_loss
from segswap.train.model import build_model
from segswap.train.stream import ShardStream, make_loader, stop_workers

log = logging.getLogger("segswap.train")
LAST = "last.pth"
CKPT_PATTERN = "ckpt-%08d.pth"
CKPT_GLOB = "ckpt-*.pth"


class SetupError(ValueError):
    """A value rejected while the run is set up (device, image size, shard list): the user's to fix."""


@contextlib.contextmanager
def setting_up():
    try:
        yield
    except SetupError:
        raise
    except ValueError as e:
        raise SetupError(str(e)) from e


class StopRequested(BaseException):
    """Raised by the signal handler out of an interruptible wait (data, validation, pool refill).

    A BaseException, so that no ``except Exception`` in the data path can swallow it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def negative_indices(batch_pos: int, batch_neg: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(i, (i + s) mod P) for s = 1, 2, … in that order, the first ``batch_neg`` of them."""
    pairs = [(i, (i + s) % batch_pos) for s in range(1, batch_pos) for i in range(batch_pos)][:batch_neg]
    if len(pairs) < batch_neg:
        raise ValueError(f"batch_neg={batch_neg} > batch_pos*(batch_pos-1)={batch_pos * (batch_pos - 1)}")
    idx = torch.tensor(pairs, dtype=torch.long).reshape(-1, 2)
    return idx[:, 0], idx[:, 1]


def seed_streams(seed: int):
    """The run's three random streams from its one seed: (model initialisation, data, spare)."""
    return np.random.SeedSequence(seed).spawn(3)


@contextlib.contextmanager
def model_init_rng(init_stream: np.random.SeedSequence):
    """Torch's RNG for building the model: forked, so the caller's global RNG is untouched, and
    seeded from the run's initialisation stream, so every rank builds identical weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(init_stream.generate_state(1)[0]))
        yield


def lr_factor(step: int, warmup_steps: int, lr_steps, lr_gamma: float) -> float:
    """Linear warm-up to 1 over ``warmup_steps``, then x ``lr_gamma`` at each step in ``lr_steps``."""
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    return warm * lr_gamma ** sum(step >= s for s in lr_steps)


class TrainStep(nn.Module):
    """What DDP wraps: the head and, with pixel contrast, its projection head."""

    def __init__(self, head: nn.Module, proj: nn.Module | None = None):
        super().__init__()
        self.head = head
        self.proj = proj

    def forward(self, feat0, feat1, pad1):
        if self.proj is None:
            return self.head(feat0, feat1, pad1)
        out = self.head(feat0, feat1, pad1, return_tokens=True)
        out["emb0"] = self.proj(out["tokens0"])
        out["emb1"] = self.proj(out["tokens1"])
        return out


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


class Trainer:
    def __init__(self, cfg: dict):
        self.cfg = cfg
        t = cfg["train"]
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        self.device = resolve_device(t["device"], local_rank=local)
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group(backend="nccl" if self.device.type == "cuda" else "gloo")
        self.out = t["out"]
        self.is_main = self.rank == 0
        self.amp_dtype = torch.bfloat16 if (t["amp"] and self.device.type == "cuda") else None
        self.stop_signal = None
        self._interruptible = False
        self._saved_step = None
        self.tb = None

    # ------------------------------------------------------------------------------- setup

    def _setup_logging(self):
        fmt = logging.Formatter("%(asctime)s %(levelname)s [rank %(rank)s] %(message)s".replace("%(rank)s", str(self.rank)))
        root = logging.getLogger()
        root.setLevel(logging.INFO)
        if not any(isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)
                   for h in root.handlers):
            sh = logging.StreamHandler(sys.stderr)
            sh.setFormatter(fmt)
            root.addHandler(sh)
        if self.is_main:
            os.makedirs(self.out, exist_ok=True)
            fh = logging.FileHandler(os.path.join(self.out, "train.log"))
            fh.setFormatter(fmt)
            root.addHandler(fh)
            self._file_handler = fh

    def _write_run_files(self, start_step: int, resumed: bool):
        if not self.is_main:
            return
        _atomic_write(os.path.join(self.out, "config.yaml"), config_mod.dump(self.cfg))
        info = {"seed": self.cfg["train"]["seed"], "start_step": start_step, "resumed": resumed,
                "world_size": self.world, "device": str(self.device), "argv": sys.argv,
                "host": socket.gethostname(), "git_rev": _git_rev(), "versions": _versions(),
                "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        _atomic_write(os.path.join(self.out, "run.json"), json.dumps(info, indent=2))
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(os.path.join(self.out, "tb"))
        except ImportError:
            log.info("tensorboard not installed: metrics go to metrics.jsonl only")

    def _build(self):
        cfg = self.cfg
        seed = int(cfg["train"]["seed"])
        init_ss, self.data_ss, _ = seed_streams(seed)
        with model_init_rng(init_ss):
            self.model = build_model(cfg["model"])
            mcfg = cfg["model"]
            resuming = cfg["train"]["resume"] and os.path.isfile(os.path.join(self.out, LAST))
            if mcfg["init"] and not resuming:
                init_weights(self.model, mcfg["init"], replace_backbone=not mcfg["backbone_weights"])
            self.proj = self.contrast_loss = None
            c = cfg["contrast"]
            if c["weight"] > 0:
                from segswap.train.pixel_contrast import PixelContrastLoss, ProjectionHead  # issue 8
                self.proj = ProjectionHead(self.model.head.d_model if hasattr(self.model.head, "d_model")
                                           else _token_dim(self.model.head), proj_dim=c["proj_dim"])
                self.contrast_loss = PixelContrastLoss(temperature=c["temperature"], queue_size=c["queue"],
                                                       embed_dim=c["proj_dim"])
        self.model.to(self.device)
        self.step_module = TrainStep(self.model.head, self.proj).to(self.device)
        if isinstance(self.contrast_loss, nn.Module):
            self.contrast_loss.to(self.device)
        self.criterion = TrainingCriterion(build_loss(cfg["loss"]), self.contrast_loss,
                                           contrast_weight=cfg["contrast"]["weight"],
                                           contrast_warmup=cfg["contrast"]["warmup"])
        o = cfg["optim"]
        self.optimizer = torch.optim.Adam([p for p in self.step_module.parameters() if p.requires_grad],
                                          lr=o["lr"], betas=tuple(o["betas"]), weight_decay=o["weight_decay"])
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: lr_factor(s, int(o["warmup_steps"]), list(o["lr_steps"]), float(o["lr_gamma"])))
        self.ddp = self.step_module
        if self.world > 1:
            self.ddp = nn.parallel.DistributedDataParallel(
                self.step_module, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def _resume(self) -> int:
        if not (self.cfg["train"]["resume"] and os.path.isfile(os.path.join(self.out, LAST))):
            return 0
        path, ck = read_resume_checkpoint(self.out, LAST, CKPT_GLOB, device=self.device)
        saved = ck.get("config", {}).get("model", {})
        for k in ("arch", "backbone", "transformer", "ncnet"):
            if saved.get(k) != self.cfg["model"].get(k):
                raise config_mod.ConfigError(
                    f"{path}: cannot resume: model.{k} was {saved.get(k)!r}, now {self.cfg['model'].get(k)!r} "
                    f"(use another --out, or pass the same model options)")
        self.model.load_state_dict(ck["model"])
        self.optimizer.load_state_dict(ck["optimizer"])
        self.scheduler.load_state_dict(ck["scheduler"])
        if self.proj is not None and "contrast" in ck:
            self.proj.load_state_dict(ck["contrast"]["head"])
            if isinstance(self.contrast_loss, nn.Module) and ck["contrast"].get("loss") is not None:
                self.contrast_loss.load_state_dict(ck["contrast"]["loss"])
        log.info("resumed from %s at step %d", path, ck["step"])
        self._saved_step = int(ck["step"])
        return int(ck["step"])

    def _feature_cache(self) -> dict | None:
        """Build (main rank) or open the --cache-features folder; None when training on images."""
        d, m = self.cfg["data"], self.cfg["model"]
        if not d["feature_cache"]:
            return None
        from segswap.train.feature_cache import build_cache, cache_identity, check_cache
        if self.is_main:
            meta = build_cache(d["feature_cache"], d["shards"], self.model, int(d["image_size"]), m["backbone"],
                               m["backbone_weights"], device=self.device)
        self._barrier()
        if not self.is_main:
            meta = check_cache(d["feature_cache"], cache_identity(d["shards"], m["backbone"], m["backbone_weights"],
                                                                  int(d["image_size"])))
        return meta

    def _stream(self, start_step: int) -> ShardStream:
        d = self.cfg["data"]
        if self.cache_meta is not None:
            from segswap.train.feature_cache import CachedFeatureAugmenter
            aug = CachedFeatureAugmenter(d["feature_cache"], self.cache_meta, **d["augment"])
        else:
            aug = PairAugmenter(image_size=d["image_size"], **d["augment"])
        return ShardStream(d["shards"], aug, seed=int(self.data_ss.generate_state(1)[0]), resampled=True,
                           shuffle_buffer=d["shuffle_buffer"], strict=d["strict"], rank=self.rank,
                           world_size=self.world, stream_id=start_step, check_md5=d["check_md5"])

    # ---------------------------------------------------------------------------- saving

    def save(self, step: int, periodic: bool = False):
        if not self.is_main:
            return
        state = {"step": step, "config": self.cfg, "model": self.model.state_dict(),
                 "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}
        if self.proj is not None:
            state["contrast"] = {"head": self.proj.state_dict(),
                                 "loss": self.contrast_loss.state_dict() if isinstance(self.contrast_loss, nn.Module) else None}
        if periodic:  # the numbered one first: last.pth is never newer than an intact fallback
            save_checkpoint(os.path.join(self.out, CKPT_PATTERN % step), state)
        save_checkpoint(os.path.join(self.out, LAST), state)
        self._saved_step = step
        log.info("saved %s at step %d", LAST if not periodic else f"{LAST} and {CKPT_PATTERN % step}", step)

    def _on_signal(self, signum, _frame):
        first = self.stop_signal is None
        self.stop_signal = signum
        if self._interruptible:
            self._interruptible = False  # once: the way out (saving) is not interrupted again
            raise StopRequested(signum)
        if first:
            log.warning("received %s: stopping after this step", signal.Signals(signum).name)

    def _interruptibly(self, fn, *args):
        """Run ``fn`` so that a stop signal interrupts it (it changes no training state)."""
        if self.stop_signal is not None:
            raise StopRequested(self.stop_signal)
        self._interruptible = True
        try:
            return fn(*args)
        finally:
            self._interruptible = False

    def _should_stop(self) -> bool:
        flag = torch.tensor([1.0 if self.stop_signal else 0.0], device=self.device)
        if self.world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())

    # ------------------------------------------------------------------------------ loop

    def run(self) -> int:
        with setting_up():
            self._setup_logging()
            self._build()
            start = self._resume()
            self.cache_meta = self._feature_cache()
            self._write_run_files(start, resumed=start > 0)
        cfg, t = self.cfg, self.cfg["train"]
        if (cfg["model"]["backbone"] == "resnet50" and cfg["model"]["backbone_weights"] is None
                and not cfg["model"]["init"] and start == 0):
            log.warning("training on a RANDOMLY INITIALISED backbone (no --backbone-weights, no --init)")
        max_steps = int(t["max_steps"])
        if start >= max_steps:
            log.info("run already at step %d >= max_steps %d: nothing to do", start, max_steps)
            return 0
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        self._step = self._saved_step = start
        try:
            return self._loop(start, max_steps)
        except StopRequested as stop:
            self._interruptible = False
            if self._step != self._saved_step:
                self.save(self._step)
            log.warning("stopped by %s at step %d; rerun the same command to resume", stop, self._step)
            return 128 + stop.signum
        finally:
            for s, h in old.items():
                signal.signal(s, h)
            if self.tb is not None:
                self.tb.close()
            if getattr(self, "_file_handler", None):
                logging.getLogger().removeHandler(self._file_handler)
                self._file_handler.close()

    def _loop(self, start: int, max_steps: int) -> int:
        d, t = self.cfg["data"], self.cfg["train"]
        P, N = int(d["batch_pos"]), int(d["batch_neg"])
        neg0, neg1 = (x.to(self.device) for x in negative_indices(P, N))
        step_rng = np.random.default_rng(np.random.SeedSequence([int(t["seed"]), self.rank, start, 7]))
        # Dropout draws from torch's global generator (it takes no other): seed it from the run seed,
        # the rank and the start step, so a run (and a resumed run) is reproducible.
        torch.manual_seed(int(np.random.SeedSequence([int(t["seed"]), self.rank, start, 11]).generate_state(1)[0]))
        gen = None
        if self.proj is not None:
            gen = torch.Generator(device=self.device)
            gen.manual_seed(int(step_rng.integers(2**62)))
        with setting_up():
            miner, pool_items, batches = self._open_data(start)
        try:
            return self._steps(start, max_steps, batches, miner, pool_items, step_rng, gen, neg0, neg1)
        finally:
            stop_workers(batches)

    def _open_data(self, start: int):
        """(hard-negative miner or None, its pool stream or None, the batch iterator)."""
        cfg, d, t = self.cfg, self.cfg["data"], self.cfg["train"]
        miner = pool_items = None
        if t["phase"] == "hardneg":
            miner = HardNegativeMiner(**cfg["hardneg"])
            pool_aug = PairAugmenter(d["image_size"], p_style=d["augment"]["p_style"], p_tps=0.0, p_swap=0.5, p_pad=0.0)
            pool_items = iter(ShardStream(d["shards"], pool_aug, seed=int(self.data_ss.generate_state(2)[1]),
                                          shuffle_buffer=d["shuffle_buffer"], strict=d["strict"], rank=self.rank,
                                          world_size=self.world, stream_id=10**9 + start,
                                          check_md5=d["check_md5"]))
        loader = make_loader(self._stream(start), batch_size=int(d["batch_pos"]), workers=int(d["workers"]))
        return miner, pool_items, self._interruptibly(iter, loader)

    def _steps(self, start, max_steps, batches, miner, pool_items, step_rng, gen, neg0, neg1) -> int:
        cfg, d, t = self.cfg, self.cfg["data"], self.cfg["train"]
        P, N = int(d["batch_pos"]), int(d["batch_neg"])
        sums, count, skipped_total = defaultdict(float), 0, 0
        t_last, data_time = time.perf_counter(), 0.0
        self.step_module.train()
        dev_type = self.device.type
        step = start
        if d["val_shards"] and start == 0 and int(t["val_every"]) > 0:
            self._validate(0)  # the untrained model's numbers: the baseline every later validation is read against
        while step < max_steps:
            if miner is not None and miner.due(step - start):
                stats = self._interruptibly(miner.refresh, self.model, pool_items, self.device, self.amp_dtype)
                self._log_json("metrics.jsonl", {"step": step, **{f"hardneg/{k}": v for k, v in stats.items()}})
            t0 = time.perf_counter()
            batch = self._interruptibly(next, batches)
            data_time += time.perf_counter() - t0
            skipped_total += int(batch["skipped"].sum())
            b = {k: v.to(self.device, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}
            if "feat0" in b:  # --cache-features: the backbone ran once, before training
                f0, f1 = b["feat0"].float(), b["feat1"].float()
            else:
                with torch.autocast(device_type=dev_type, dtype=self.amp_dtype or torch.bfloat16,
                                    enabled=self.amp_dtype is not None):
                    f0, f1 = self.model.features(b["img0"]), self.model.features(b["img1"])
            feat0, feat1 = torch.cat([f0, f0[neg0]]), torch.cat([f1, f1[neg1]])
            pad = torch.cat([b["pad1"], torch.zeros_like(b["pad1"][:1]).expand(N, -1, -1)])
            if miner is not None:
                hard = miner.sample(step_rng)
                if hard is not None:
                    feat0, feat1 = torch.cat([feat0, hard[0]]), torch.cat([feat1, hard[1]])
                    pad = torch.cat([pad, torch.zeros_like(pad[:1]).expand(hard[0].shape[0], -1, -1)])
            with torch.autocast(device_type=dev_type, dtype=self.amp_dtype or torch.bfloat16,
                                enabled=self.amp_dtype is not None):
                out = self.ddp(feat0, feat1, pad)
            terms = self.criterion(out, b, n_pos=P, step=step, generator=gen)
            terms["total"] = sum(terms.values())
            self.optimizer.zero_grad(set_to_none=True)
            terms["total"].backward()
            if float(cfg["optim"]["grad_clip"]) > 0:
                terms["grad_norm"] = torch.nn.utils.clip_grad_norm_(self.step_module.parameters(),
                                                                    float(cfg["optim"]["grad_clip"]))
            self.optimizer.step()
            self.scheduler.step()
            step += 1
            self._step = step
            for k, v in terms.items():
                sums[k] += float(v.detach())
            count += 1
            if step % int(t["log_every"]) == 0 or step == max_steps:
                now = time.perf_counter()
                rec = {"step": step, "lr": self.optimizer.param_groups[0]["lr"],
                       **{f"loss/{k}": v / count for k, v in sums.items()},
                       "it_per_s": count / (now - t_last), "data_time_frac": data_time / (now - t_last),
                       "mem_mb": _peak_memory_mb(self.device), "skipped": skipped_total}
                log.info("step %d/%d  loss %.4f (mask %.4f, tm %.4f, corr %.4f%s)  lr %.2e  %.2f it/s  data %.0f%%  mem %.0f MB  skipped %d",
                         step, max_steps, rec["loss/total"], rec["loss/mask"], rec["loss/transported_mask"],
                         rec["loss/corr"], f", contrast {rec['loss/contrast']:.4f}" if "loss/contrast" in rec else "",
                         rec["lr"], rec["it_per_s"], 100 * rec["data_time_frac"], rec["mem_mb"], skipped_total)
                self._log_json("metrics.jsonl", rec)
                sums, count, t_last, data_time = defaultdict(float), 0, now, 0.0
            stop = self._should_stop()
            if stop or step == max_steps:
                break
            if int(t["ckpt_every"]) > 0 and step % int(t["ckpt_every"]) == 0:
                self.save(step, periodic=True)
            if d["val_shards"] and int(t["val_every"]) > 0 and step % int(t["val_every"]) == 0:
                self._validate(step)
        self.save(step, periodic=int(t["ckpt_every"]) > 0 and step % int(t["ckpt_every"]) == 0)
        if self.stop_signal:
            self._barrier()
            log.warning("stopped by %s at step %d; rerun the same command to resume",
                        signal.Signals(self.stop_signal).name, step)
            return 128 + int(self.stop_signal)
        if d["val_shards"]:
            self._validate(step)
        self._barrier()
        log.info("done: %d steps, %d corrupt samples skipped", step, skipped_total)
        return 0

    def _validate(self, step: int):
        self._interruptibly(self._validate_now, step)

    def _validate_now(self, step: int):
        if self.is_main:
            t = self.cfg["train"]
            m = validate(self.model, self.cfg["data"]["val_shards"], int(self.cfg["data"]["image_size"]),
                         int(t["val_pairs"]), self.device, amp_dtype=self.amp_dtype)
            self.model.train()
            log.info("validation at step %d on %d pairs: mask IoU %.3f, corr error %.2f px, mask on fg/bg %.3f/%.3f, "
                     "negative mask %.3f", step, m["pairs"], m["iou"], m["corr_err_px"], m["fg_mask"], m["bg_mask"],
                     m["neg_mask"])
            self._log_json("val.jsonl", {"step": step, **m})
            write_validation_sheet(self.model, self.cfg["data"]["val_shards"], int(self.cfg["data"]["image_size"]),
                                   self.device, self.out, step, self.tb, self.amp_dtype)  # RUN/val/step-NNNNNN.png
        self._barrier()

    def _barrier(self):
        if self.world > 1:
            dist.barrier()

    def _log_json(self, name: str, rec: dict):
        if not self.is_main:
            return
        with open(os.path.join(self.out, name), "a") as f:
            f.write(json.dumps(rec) + "\n")
        if self.tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.tb.add_scalar(k, v, rec["step"])


def _token_dim(head: nn.Module) -> int:
    for attr in ("d_model", "token_dim", "out_dim"):
        if hasattr(head, attr):
            return int(getattr(head, attr))
    raise ValueError(f"{type(head).__name__} does not say its token dimension (d_model); pixel contrast needs it")


def train(cfg: dict) -> int:
    with setting_up():
        trainer = Trainer(cfg)
    try:
        with torch.enable_grad():  # whatever mode the caller left torch in (an evaluation in the same process)
            return trainer.run()
    finally:
        if trainer.world > 1 and dist.is_initialized():
            dist.destroy_process_group()
