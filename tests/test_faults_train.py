"""Fault battery of the training side: bad shards, stop signals, user errors. Every case that could hang
runs in a subprocess with a timeout, so a hang fails the test instead of the whole run.

Each damaged-shard case is read through the trainer's stream (ShardStream + DataLoader) with 0 and 2
workers, with and without ``strict``, in one subprocess per case; a few cases also go through
``segswap-train`` end to end.
"""
import json
import os
import resource
import signal
import subprocess
import sys
import tarfile
import textwrap
import time

import pytest
from synthetic_shards import write_synthetic_shards

from segswap.shards import index as shard_index
from segswap.shards.reader import iter_pairs

TESTS = os.path.dirname(os.path.abspath(__file__))
LIMIT_S = 120  # per subprocess: far above what a case needs, far below a hang
TINY = ["--model", "tiny", "--image-size", "64", "--batch-pos", "2", "--batch-neg", "2", "--log-every", "1",
        "--shuffle-buffer", "4", "--ckpt-every", "0", "--warmup-steps", "1"]
PAIRS = 8


def _env():
    env = dict(os.environ, PYTHONPATH=TESTS + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def _damage(kind: str, good: str, folder: str) -> str:
    """Write a shard (or index) damaged as ``kind`` into ``folder``; returns the --shards value."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "train-000000.tar")
    data = open(good, "rb").read()
    if kind == "index.json":  # a good shard, named through its index: must train
        with open(path, "wb") as f:
            f.write(data)
        shard_index.write_index(folder)
        return os.path.join(folder, "index.json")
    if kind == "zero-byte":
        data = b""
    elif kind == "not-a-tar":
        data = b"this is not a tar file\n" * 100
    elif kind == "truncated":
        data = data[: len(data) // 2]
    elif kind == "corrupt-header":
        with tarfile.open(good) as tar:
            members = tar.getmembers()
        mid = members[len(members) // 2].offset  # a header in the middle of the shard
        data = data[:mid] + b"X" * 20 + data[mid + 20:]
    with open(path, "wb") as f:
        f.write(data)
    return path


@pytest.fixture(scope="module")
def good_shard(tmp_path_factory):
    d = tmp_path_factory.mktemp("good")
    return write_synthetic_shards(d, n_shards=1, pairs_per_shard=PAIRS, size=64, seed=0)


# ------------------------------------------------------------------------------ the stream battery

DRIVER = textwrap.dedent("""
    import json, sys
    from segswap.train.augment import no_augment
    from segswap.train.stream import ShardStream, make_loader
    shards, = sys.argv[1:]
    out = []
    for workers in (0, 2):
        for strict in (False, True):
            rec = {"workers": workers, "strict": strict}
            try:
                stream = ShardStream(shards, no_augment(64), resampled=True, shuffle_buffer=1, strict=strict)
                batches = iter(make_loader(stream, batch_size=2, workers=workers))
                got = [next(batches) for _ in range(8)]  # 8 items per worker: past the damage of a first pass
                rec.update(outcome="ok", skipped=int(sum(b["skipped"].sum() for b in got)))
            except Exception as e:
                rec.update(outcome="error", error=type(e).__name__, message=str(e).strip().splitlines()[-1])
            out.append(rec)
    print(json.dumps(out))
""")

# case -> (outcome without strict, outcome with strict)
BATTERY = {
    "index.json": ("ok", "ok"),
    "zero-byte": ("stall", "damaged"),
    "not-a-tar": ("stall", "damaged"),
    "truncated": ("ok", "damaged"),        # the 4 complete samples before the damage are used
    "corrupt-header": ("ok", "damaged"),
}


@pytest.mark.parametrize("case", sorted(BATTERY))
def test_stream_battery(case, good_shard, tmp_path):
    shards = _damage(case, good_shard, str(tmp_path / case))
    r = subprocess.run([sys.executable, "-c", DRIVER, shards], capture_output=True, text=True, timeout=LIMIT_S,
                       env=_env())
    assert r.returncode == 0, r.stderr[-2000:]
    records = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(records) == 4
    for rec in records:
        want = BATTERY[case][rec["strict"]]
        if want == "ok":
            assert rec["outcome"] == "ok", rec
            if case != "index.json":
                assert rec["skipped"] >= 1, rec  # the damage is counted, not silent
        else:
            assert rec["outcome"] == "error", rec
            assert "train-000000.tar" in rec["message"], rec  # names the shard
            if want == "stall":
                assert rec["error"] == "StreamStalled" and "no sample from the last" in rec["message"], rec
            else:
                assert rec["error"] == "DamagedShard", rec
    # warnings are rate-limited: a stalled stream logs a handful of lines, not thousands
    assert r.stderr.count("\n") < 60, r.stderr[-2000:]


# -------------------------------------------------------------------- reader: counts, index, pipe:

def test_strict_reader_fails_at_tar_damage_and_default_counts_it(good_shard, tmp_path):
    from segswap.shards.reader import DamagedShard
    from segswap.train.augment import no_augment
    from segswap.train.stream import ShardStream

    for case in ("truncated", "corrupt-header"):
        shard = _damage(case, good_shard, str(tmp_path / case))
        stream = ShardStream(shard, no_augment(64), resampled=False)
        items = list(stream)
        assert len(items) == 4  # the complete samples before the damage
        assert stream.source.skipped_total == 1  # no index.json: the damaged read counts once
        with pytest.raises(DamagedShard, match="train-000000.tar"):
            list(ShardStream(shard, no_augment(64), resampled=False, strict=True))
        with pytest.raises(DamagedShard):
            list(iter_pairs(shard))


def test_index_json_beside_shards_catches_size_and_md5(good_shard, tmp_path):
    """With index.json beside it, a damaged shard is skipped whole and its samples counted exactly."""
    from segswap.shards.reader import DamagedShard
    from segswap.train.augment import no_augment
    from segswap.train.stream import ShardStream

    folder = tmp_path / "d"
    shard = _damage("index.json", good_shard, str(folder))[: -len("index.json")] + "train-000000.tar"
    data = bytearray(open(shard, "rb").read())
    with tarfile.open(shard) as tar:
        jpg = next(m for m in tar.getmembers() if m.name.endswith("img0.jpg"))
    data[jpg.offset_data + jpg.size // 2] ^= 0xFF  # one flipped byte inside a JPEG: decodes "fine"
    open(shard, "wb").write(bytes(data))
    stream = ShardStream(shard, no_augment(64), resampled=False)
    assert list(stream) == [] and stream.source.skipped_total == PAIRS
    with pytest.raises(DamagedShard, match=r"md5 .* index\.json says"):
        list(ShardStream(shard, no_augment(64), resampled=False, strict=True))
    assert len(list(ShardStream(shard, no_augment(64), resampled=False, check_md5=False))) == PAIRS
    open(shard, "wb").write(bytes(data[: len(data) // 2]))
    with pytest.raises(DamagedShard, match=r"size \d+ bytes, index\.json says"):
        list(ShardStream(shard, no_augment(64), resampled=False, strict=True))
    # two shards indexed, then one truncated: the other is read, the count says how many samples were lost
    both = write_synthetic_shards(tmp_path / "e", n_shards=2, pairs_per_shard=PAIRS, size=64, seed=3)
    shard_index.write_index(str(tmp_path / "e"))
    first = str(tmp_path / "e" / "train-000000.tar")
    open(first, "wb").write(open(first, "rb").read()[:5000])
    stream = ShardStream(both, no_augment(64), resampled=False)
    assert len(list(stream)) == PAIRS and stream.source.skipped_total == PAIRS


def test_pipe_urls_inside_index_json_are_never_run(good_shard, tmp_path):
    victim = tmp_path / "pwned"
    index = {"__kind__": "wids-shard-index-v1", "wids_version": 1, "name": "x",
             "shardlist": [{"url": f"pipe:touch {victim}; cat {good_shard}", "nsamples": PAIRS,
                            "filesize": 1, "md5sum": "0"}]}
    (tmp_path / "index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"index\.json: shardlist\[0\] is a command"):
        list(iter_pairs(str(tmp_path / "index.json")))
    assert not victim.exists()
    # typed by the user, a pipe: URL is honoured
    assert len(list(iter_pairs(f"pipe:cat {good_shard}"))) == PAIRS


# ------------------------------------------------------------------------------ segswap-train runs

def _train(args, timeout=LIMIT_S, **kw):
    return subprocess.run([sys.executable, "-m", "segswap.train.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=_env(), **kw)


def _error_line(r):
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("segswap-train:")]
    assert len(lines) == 1, r.stderr[-3000:]
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    return lines[0]


@pytest.mark.parametrize("case,workers,strict", [
    ("index.json", 0, False),
    ("zero-byte", 2, False),
    ("truncated", 2, True),
])
def test_trainer_on_damaged_shards(case, workers, strict, good_shard, tmp_path):
    shards = _damage(case, good_shard, str(tmp_path / "s"))
    r = _train(["--shards", shards, "--out", str(tmp_path / "run"), "--max-steps", "1", "--workers", str(workers),
                *(["--strict-data"] if strict else []), *TINY])
    if case == "index.json":
        assert r.returncode == 0, r.stderr[-3000:]
        assert (tmp_path / "run" / "last.pth").exists()
        return
    assert r.returncode == 2, r.stderr[-3000:]
    line = _error_line(r)
    assert "train-000000.tar" in line
    assert ("no sample from the last" in line) if not strict else ("unreadable tar" in line)


def _processes_with(marker: str) -> list[int]:
    pids = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    if marker.encode() in f.read():
                        pids.append(int(pid))
            except OSError:
                pass
    return pids


@pytest.mark.parametrize("workers", [0, 2])
def test_sigterm_while_the_stream_blocks(workers, good_shard, tmp_path):
    """Two steps' worth of samples per worker, then a stream that never delivers: SIGTERM saves the last step and exits 143
    within seconds, and no worker survives."""
    out = tmp_path / "run"
    blocked = f"pipe:head -c 120000 {good_shard}; exec sleep 600"  # 5 of 8 samples, then nothing
    args = ["--shards", blocked, "--out", str(out), "--max-steps", "100", "--workers", str(workers), *TINY,
            "--shuffle-buffer", "1"]
    # stderr to a file: the shell of a pipe: URL (and its sleep) may outlive a worker and hold a pipe open
    log = open(tmp_path / "stderr.txt", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "segswap.train.cli", *args], stdout=subprocess.DEVNULL,
                            stderr=log, text=True, env=_env())
    try:
        t0 = time.time()
        while not ((out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 2):
            assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()[-3000:]
            assert time.time() - t0 < LIMIT_S, "no step within the limit"
            time.sleep(0.2)
        time.sleep(1.0)  # now blocked in next(batches)
        t_sig = time.time()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=30)
        took = time.time() - t_sig
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    log.close()
    err = (tmp_path / "stderr.txt").read_text()
    assert rc == 128 + signal.SIGTERM, err[-3000:]
    assert took < 30
    from segswap.train.checkpoint import read_checkpoint
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] >= 2 and read_checkpoint(out / "last.pth")["step"] == steps[-1]  # each worker: 2 batches
    assert f"stopped by SIGTERM at step {steps[-1]}" in err
    deadline = time.time() + 5
    while _processes_with(str(out)) and time.time() < deadline:
        time.sleep(0.2)
    assert _processes_with(str(out)) == []  # no DataLoader worker outlives the trainer


def test_user_errors_are_one_line_exit_2(good_shard, tmp_path):
    cases = {
        "missing shards": (["--shards", str(tmp_path / "nope-{000000..000001}.tar")], "shards do not exist"),
        "bad value": (["--shards", good_shard, "--image-size", "50"], "multiple of the feature stride"),
        "no such device": (["--shards", good_shard, "--device", "cuda:1"], "cuda:1"),
    }
    (tmp_path / "file").write_text("x")
    cases["out is not a folder"] = (["--shards", good_shard, "--out", str(tmp_path / "file" / "run")], "file/run")
    for name, (args, needle) in cases.items():
        if name == "no such device":
            import torch
            if torch.cuda.is_available():
                continue
        if "--out" not in args:
            args = [*args, "--out", str(tmp_path / name.replace(" ", "_"))]
        r = _train(["--max-steps", "1", "--workers", "0", *TINY, *args])  # the case's flags last: they win
        assert r.returncode == 2, (name, r.stderr[-3000:])
        assert needle in _error_line(r), (name, r.stderr[-3000:])
    r = _train(["--shards", good_shard, "--out", str(tmp_path / "dbg"), "--image-size", "50", "--debug",
                "--max-steps", "1", "--workers", "0"])
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_disk_full_when_saving_leaves_nothing_partial(good_shard, tmp_path):
    out = tmp_path / "run"
    limit = 1 << 20  # run files fit, a checkpoint does not: the write fails as on a full disk
    r = _train(["--shards", good_shard, "--out", str(out), "--max-steps", "1", "--workers", "0", *TINY],
               preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)))
    assert r.returncode == 2, r.stderr[-3000:]
    line = _error_line(r)
    assert "last.pth" in line and "cannot save" in line
    assert not any(n.endswith((".pth", ".tmp")) for n in os.listdir(out)), os.listdir(out)


def test_truncated_last_pth_falls_back_to_the_newest_intact_checkpoint(good_shard, tmp_path):
    out = tmp_path / "run"
    base = ["--shards", good_shard, "--out", str(out), "--workers", "0", *TINY]
    r = _train([*base, "--max-steps", "2", "--ckpt-every", "1"])
    assert r.returncode == 0, r.stderr[-3000:]
    last = out / "last.pth"
    last.write_bytes(last.read_bytes()[:1000])
    r = _train([*base, "--max-steps", "3"])
    assert r.returncode == 0, r.stderr[-3000:]
    assert "last.pth cannot be read" in r.stderr and "ckpt-00000002.pth (step 2)" in r.stderr
    from segswap.train.checkpoint import read_checkpoint
    assert read_checkpoint(last)["step"] == 3
