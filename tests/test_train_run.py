"""segswap-train end to end on tiny synthetic shards: run directory, resume after SIGTERM/SIGKILL, hard negatives, torchrun."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import yaml
from synthetic_shards import write_synthetic_shards

from segswap.train import cli
from segswap.train.checkpoint import load_model, read_checkpoint
from segswap.train.trainer import Trainer

TINY = ["--model", "tiny", "--image-size", "64", "--batch-pos", "2", "--batch-neg", "2", "--workers", "0",
        "--log-every", "1", "--warmup-steps", "2", "--shuffle-buffer", "4"]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("shards")
    train = write_synthetic_shards(d / "train", n_shards=2, pairs_per_shard=6, size=64, seed=0)
    val = write_synthetic_shards(d / "val", n_shards=1, pairs_per_shard=4, size=64, seed=1, first_shard=7)
    return train, val


@pytest.fixture(scope="module")
def main_run(shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "main"
    rc = cli.main(["--shards", shards[0], "--val-shards", shards[1], "--out", str(out), "--max-steps", "3",
                   "--val-every", "2", "--val-pairs", "4", "--ckpt-every", "2", *TINY])
    assert rc == 0
    return out


def _lines(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_run_directory_has_everything_to_reproduce(main_run):
    names = set(os.listdir(main_run))
    assert {"config.yaml", "run.json", "train.log", "metrics.jsonl", "val.jsonl", "last.pth", "ckpt-00000002.pth"} <= names
    cfg = yaml.safe_load((main_run / "config.yaml").read_text())
    assert cfg["model"]["transformer"]["model"] == "tiny" and cfg["optim"]["lr"] == 2e-4
    assert cfg["optim"]["betas"] == [0.5, 0.999]
    info = json.loads((main_run / "run.json").read_text())
    assert info["seed"] == 0 and "torch" in info["versions"]
    metrics = _lines(main_run / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for key in ("loss/mask", "loss/transported_mask", "loss/corr", "loss/total", "it_per_s", "mem_mb", "lr"):
        assert all(key in m for m in metrics)
    assert metrics[0]["lr"] == pytest.approx(2e-4)  # warm-up of 2: step 1 -> factor 1 once step 2 starts
    val = _lines(main_run / "val.jsonl")
    assert [v["step"] for v in val] == [0, 2, 3] and val[0]["pairs"] == 4
    assert 0 <= val[-1]["iou"] <= 1 and val[-1]["corr_err_px"] >= 0
    assert 0 < val[-1]["fg_mask"] < 1 and 0 < val[-1]["bg_mask"] < 1
    ck = read_checkpoint(main_run / "last.pth")
    assert ck["step"] == 3 and ck["format"] == "segswap-train"
    model = load_model(main_run / "last.pth")
    with torch.no_grad():
        out = model(torch.zeros(1, 64, 64, 3, dtype=torch.uint8), torch.zeros(1, 64, 64, 3, dtype=torch.uint8))
    assert out["mask0"].shape == (1, 4, 4)


def test_same_seed_same_weights(main_run, shards, tmp_path):
    out = tmp_path / "again"
    assert cli.main(["--shards", shards[0], "--out", str(out), "--max-steps", "3", "--ckpt-every", "0", *TINY]) == 0
    a, b = read_checkpoint(main_run / "last.pth")["model"], read_checkpoint(out / "last.pth")["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_pixel_contrast_hook(shards, tmp_path):
    out = tmp_path / "contrast"
    assert cli.main(["--shards", shards[0], "--out", str(out), "--max-steps", "2", "--pixel-contrast", "0.1",
                     "--contrast-warmup", "1", "--contrast-queue", "16", *TINY]) == 0
    recs = _lines(out / "metrics.jsonl")
    assert recs[0]["loss/contrast"] == 0.0 and recs[1]["loss/contrast"] > 0
    ck = read_checkpoint(out / "last.pth")
    assert "contrast" in ck and ck["contrast"]["loss"] is not None


def test_unknown_config_key_is_an_error(tmp_path, shards, capsys):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("optim:\n  learning_rate: 0.1\n")
    assert cli.main(["--config", str(cfg), "--shards", shards[0], "--out", str(tmp_path / "r")]) == 2
    assert "optim.learning_rate" in capsys.readouterr().err


def _spawn(args, log):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "segswap.train.cli", *args], stdout=log, stderr=subprocess.STDOUT, env=env)


def _wait_for(cond, proc, timeout=120):
    t0 = time.time()
    while not cond():
        assert proc.poll() is None, "trainer exited early"
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.2)


def test_sigterm_saves_and_sigkill_resumes_with_identical_optimizer(shards, tmp_path):
    out = tmp_path / "run"
    args = ["--shards", shards[0], "--out", str(out), "--max-steps", "1000", "--ckpt-every", "0", *TINY]
    with open(tmp_path / "log1.txt", "w") as log:
        proc = _spawn(args, log)
        _wait_for(lambda: (out / "metrics.jsonl").exists(), proc)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 128 + signal.SIGTERM
    first = read_checkpoint(out / "last.pth")
    assert first["step"] >= 1

    # Resume (the default), then die without warning once a later step is on disk.
    args_every = ["--shards", shards[0], "--out", str(out), "--max-steps", "1000", "--ckpt-every", "1", *TINY]
    with open(tmp_path / "log2.txt", "w") as log:
        proc = _spawn(args_every, log)
        _wait_for(lambda: read_checkpoint(out / "last.pth")["step"] >= first["step"] + 2, proc)
        proc.kill()
        proc.wait()
    saved = read_checkpoint(out / "last.pth")
    assert saved["step"] >= first["step"] + 2
    info = json.loads((out / "run.json").read_text())
    assert info["resumed"] and info["start_step"] == first["step"]

    cfg = cli.config_from_args(cli.get_args_parser().parse_args(
        ["--shards", shards[0], "--out", str(out), "--max-steps", str(saved["step"] + 1), *TINY]))
    trainer = Trainer(cfg)
    trainer._build()
    assert trainer._resume() == saved["step"]
    got, want = trainer.optimizer.state_dict(), saved["optimizer"]
    assert got["param_groups"] == want["param_groups"]
    assert got["state"].keys() == want["state"].keys()
    for k in want["state"]:
        for name, v in want["state"][k].items():
            assert torch.equal(got["state"][k][name], v), (k, name)
    assert trainer.scheduler.state_dict()["last_epoch"] == saved["step"]
    # and the run continues from there
    assert Trainer(cfg).run() == 0
    assert read_checkpoint(out / "last.pth")["step"] == saved["step"] + 1
    assert _lines(out / "metrics.jsonl")[-1]["step"] == saved["step"] + 1


def test_hardneg_phase_end_to_end(main_run, shards, tmp_path):
    out = tmp_path / "hard"
    rc = cli.main(["--phase", "hardneg", "--init", str(main_run / "last.pth"), "--shards", shards[0],
                   "--out", str(out), "--max-steps", "3", "--hardneg-pool", "4", "--hardneg-iters", "2",
                   "--hardneg-batch", "2", "--hardneg-threshold", "0", *TINY])
    assert rc == 0
    cfg = yaml.safe_load((out / "config.yaml").read_text())
    assert cfg["optim"]["lr"] == 1e-5  # the phase's default learning rate
    recs = _lines(out / "metrics.jsonl")
    pools = [r for r in recs if "hardneg/hard_pairs" in r]
    assert [p["step"] for p in pools] == [0, 2]
    assert all(p["hardneg/pool_pairs"] == 6 and p["hardneg/hard_pairs"] == 6 for p in pools)
    assert [r["step"] for r in recs if "loss/total" in r] == [1, 2, 3]


def test_phase_defaults():
    main = cli.config_from_args(cli.get_args_parser().parse_args(["--shards", "x.tar", "--out", "o"]))
    hard = cli.config_from_args(cli.get_args_parser().parse_args(
        ["--shards", "x.tar", "--out", "o", "--phase", "hardneg", "--init", "c.pth"]))
    assert (main["optim"]["lr"], main["optim"]["warmup_steps"]) == (2e-4, 1000)
    assert (hard["optim"]["lr"], hard["optim"]["warmup_steps"]) == (1e-5, 0)
    assert (main["data"]["batch_pos"], main["data"]["batch_neg"], main["loss"]["eta"]) == (5, 15, 8.0)


def test_hardneg_needs_init(shards, tmp_path, capsys):
    assert cli.main(["--phase", "hardneg", "--shards", shards[0], "--out", str(tmp_path / "x")]) == 2
    assert "--init" in capsys.readouterr().err


@pytest.mark.slow
def test_torchrun_two_processes_gloo(shards, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
           "-m", "segswap.train.cli", "--shards", shards[0], "--out", str(out), "--max-steps", "2",
           "--device", "cpu", *TINY]
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert json.loads((out / "run.json").read_text())["world_size"] == 2
    assert read_checkpoint(out / "last.pth")["step"] == 2
    assert "[rank 1]" in res.stderr
