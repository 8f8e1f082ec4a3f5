"""Fault battery for the generator side (segswap-gen, segswap-segments, segswap-show, segswap-discover
and the core layer they share): each test reproduces a reported failure and asserts the new behaviour.

Every subprocess has a timeout, so a hang fails the test instead of stalling the run. Disk-full and
read-only outputs are real filesystems: a tmpfs mounted in a private user + mount namespace
(``unshare -rm``), skipped where the kernel does not allow that.
"""
import ipaddress
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from coco_fixture import write_coco_fixture
from PIL import Image

from segswap.core.images import load_rgb
from segswap.core.listing import list_images
from segswap.segments.coco import SegmentIndex

NUM_SHARDS = 3
PAIRS = 2
SUBPROCESS_TIMEOUT = 300


def _can_unshare() -> bool:
    if not shutil.which("unshare"):
        return False
    try:
        return subprocess.run(["unshare", "-rm", "true"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


needs_unshare = pytest.mark.skipif(not _can_unshare(), reason="needs unshare -rm (user + mount namespaces)")


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return write_coco_fixture(tmp_path_factory.mktemp("coco"), n_images=6, width=128, height=96, bad_entries=True)


def _gen_args(coco, out, *extra):
    return ["--segments", "coco", "--images", str(coco.images_dir), "--coco-annotations", str(coco.json_path),
            "--out", str(out), "--num-shards", str(NUM_SHARDS), "--pairs-per-shard", str(PAIRS),
            "--size", "128", "--min-cells", "1", "--seed", "5", "--style", "none", *extra]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _gen(args, timeout=SUBPROCESS_TIMEOUT, **kw):
    return subprocess.run([sys.executable, "-m", "segswap.pipeline.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env=_env(), **kw)


def _tmp_files(root) -> list[str]:
    """Every temporary file left anywhere under root (hidden ones included)."""
    return [os.path.join(d, f) for d, _, files in os.walk(root) for f in files if ".tmp" in f]


def _error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if " ERROR " in ln or ln.startswith("segswap")]


def _in_tmpfs(mount: Path, size: str, command: list[str], readonly: bool = False, timeout=SUBPROCESS_TIMEOUT):
    """Run ``command`` with a fresh tmpfs of ``size`` at ``mount`` (optionally read-only)."""
    mount.mkdir(parents=True, exist_ok=True)
    script = f'mount -t tmpfs -o size={size} tmpfs "$1" && '
    if readonly:
        script += 'mount -o remount,ro "$1" && '
    script += 'shift && exec "$@"; '
    return subprocess.run(["unshare", "-rm", "sh", "-c", script, "sh", str(mount), *command],
                          capture_output=True, text=True, timeout=timeout, env=_env())


# ------------------------------------------------------------------------------- output faults

@needs_unshare
def test_gen_read_only_out_is_one_line_exit_2(coco, tmp_path):
    mount = tmp_path / "ro"
    cmd = [sys.executable, "-m", "segswap.pipeline.cli", *_gen_args(coco, mount / "pairs", "--workers", "0")]
    r = _in_tmpfs(mount, "1m", cmd, readonly=True)
    assert r.returncode == 2, r.stderr
    assert "Traceback" not in r.stderr
    errors = _error_lines(r.stderr)
    assert len(errors) == 1 and "--out" in errors[0] and "Read-only file system" in errors[0], r.stderr


@needs_unshare
def test_gen_disk_full_is_one_line_exit_2_and_leaves_nothing_partial(coco, tmp_path):
    # Measure a shard, then give the output folder room for about one of them.
    ref = tmp_path / "ref"
    r = _gen(_gen_args(coco, ref, "--workers", "0", "--num-shards", "1"))
    assert r.returncode == 0, r.stderr
    shard = (ref / "train-000000.tar").stat().st_size
    mount = tmp_path / "full"
    cmd = [sys.executable, "-m", "segswap.pipeline.cli", *_gen_args(coco, mount / "pairs", "--workers", "0")]
    # The check inside the namespace: after the run, list what is left there (the mount vanishes with it).
    probe = ("import json, os, sys; root = sys.argv[1]; "
             "print(json.dumps({'files': sorted(os.path.relpath(os.path.join(d, f), root) "
             "for d, _, fs in os.walk(root) for f in fs), "
             "'manifest_ok': (not os.path.exists(os.path.join(root, 'manifest.json'))) or "
             "bool(json.load(open(os.path.join(root, 'manifest.json'))))}))")
    script = [sys.executable, "-c", (
        "import subprocess, sys; r = subprocess.run(sys.argv[2:], capture_output=True, text=True); "
        "sys.stderr.write(r.stderr); print('RC', r.returncode); "
        "subprocess.run([sys.executable, '-c', " + repr(probe) + ", sys.argv[1]])"), str(mount / "pairs"), *cmd]
    r = _in_tmpfs(mount, f"{(shard * 3) // 2 // 1024 + 8}k", script)
    rc = int(re.search(r"RC (\d+)", r.stdout).group(1))
    left = json.loads(r.stdout.strip().splitlines()[-1])
    assert rc == 2, r.stderr
    assert "Traceback" not in r.stderr
    errors = _error_lines(r.stderr)
    assert len(errors) == 1 and "No space left on device" in errors[0] and "rerun to resume" in errors[0], r.stderr
    assert not [f for f in left["files"] if ".tmp" in f], left
    assert left["manifest_ok"]
    assert "train-000000.tar" in left["files"]  # what was finished stays


# ------------------------------------------------------------------------------------- signals

def _wait_for(cond, proc, timeout=180):
    t0 = time.time()
    while not cond():
        if proc.poll() is not None:
            raise AssertionError(f"process ended early with {proc.returncode}: {proc.stderr.read()}")
        if time.time() - t0 > timeout:
            proc.kill()
            raise AssertionError("timed out waiting")
        time.sleep(0.1)


@pytest.mark.parametrize("workers,sig", [("0", signal.SIGTERM), ("2", signal.SIGINT)])
def test_gen_signal_says_what_is_finished_and_exits_128_plus_n(coco, tmp_path, workers, sig):
    out = tmp_path / "pairs"
    args = _gen_args(coco, out, "--workers", workers, "--num-shards", "40", "--pairs-per-shard", "4")
    proc = subprocess.Popen([sys.executable, "-m", "segswap.pipeline.cli", *args], stderr=subprocess.PIPE,
                            stdout=subprocess.DEVNULL, text=True, env=_env())
    try:
        _wait_for(lambda: any(out.glob("train-*.tar")), proc)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + sig, err
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    line = [ln for ln in err.splitlines() if "stopped by" in ln]
    assert len(line) == 1 and signal.Signals(sig).name in line[0], err
    finished = int(re.search(r"(\d+) of 40 selected shards are finished", line[0]).group(1))
    assert finished >= 1 and "rerun the same command to resume" in line[0]
    assert not _tmp_files(out), _tmp_files(out)
    if workers == "0":  # the rerun resumes: the finished shards are not generated again
        r = _gen([*args, "--num-shards", "40", "--shard-range", "0:%d" % finished])
        assert r.returncode == 0, r.stderr
        assert f"{finished} already finished, 0 to generate" in r.stderr


# --------------------------------------------------------------------------- skips, named and counted

def test_gen_names_each_skip_with_ray_workers_and_records_coco_skips(coco, tmp_path):
    # A copy of the fixture with two images damaged: every draw of them is a bad_image skip.
    root = tmp_path / "fixture"
    shutil.copytree(coco.images_dir, root / "images")
    for f in sorted((root / "images").iterdir())[:2]:
        f.write_bytes(f.read_bytes()[:200])
    args = ["--segments", "coco", "--images", str(root / "images"), "--coco-annotations", str(coco.json_path),
            "--out", str(tmp_path / "pairs"), "--num-shards", "4", "--pairs-per-shard", "4", "--size", "128",
            "--min-cells", "1", "--seed", "5", "--style", "none", "--workers", "2"]
    r = _gen(args)
    assert r.returncode == 0, r.stderr
    named = [ln for ln in r.stderr.splitlines() if "pair attempt skipped (bad_image)" in ln]
    assert 1 <= len(named) <= 3, r.stderr  # the first few, once each, however many workers ran
    assert "truncated or corrupt" in named[0] and "/images/" in named[0]
    coco_named = [ln for ln in r.stderr.splitlines() if "segments file: skipped" in ln]
    assert coco_named and all(str(coco.json_path) in ln for ln in coco_named)
    assert len(coco_named) == len(set(coco_named))  # once for the job, not once per worker
    manifest = json.loads((tmp_path / "pairs" / "manifest.json").read_text())
    assert manifest["skips"].get("bad_image", 0) >= len(named)
    assert manifest["segment_skips"] == dict(sorted(coco.skipped.items()))
    summary_line = [ln for ln in r.stderr.splitlines() if "done:" in ln][0]
    assert "skipped in the segments file: " in summary_line and "unknown_image: 2" in summary_line


def test_coco_duplicate_annotation_ids_and_unknown_categories_are_named_skips(tmp_path, caplog):
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(tmp_path / "a.png")
    square = [5.0, 5.0, 30.0, 5.0, 30.0, 30.0, 5.0, 30.0]
    data = {"images": [{"id": 1, "file_name": "a.png", "width": 40, "height": 40}],
            "categories": [{"id": 1, "name": "thing"}],
            "annotations": [{"id": 7, "image_id": 1, "category_id": 1, "segmentation": [square]},
                            {"id": 7, "image_id": 1, "category_id": 1, "segmentation": [square]},
                            {"id": 8, "image_id": 1, "category_id": 42, "segmentation": [square]}]}
    (tmp_path / "ann.json").write_text(json.dumps(data))
    with caplog.at_level("WARNING"):
        index = SegmentIndex.from_coco(tmp_path / "ann.json")
    assert len(index) == 1
    assert index.skipped == {"duplicate_annotation_id": 1, "unknown_category": 1}
    text = caplog.text
    assert "annotation id 7" in text and "duplicate annotation id" in text
    assert "annotation id 8" in text and "category_id 42" in text


def test_show_draws_polygon_segmentations(coco, tmp_path):
    out = tmp_path / "sheet.png"
    r = subprocess.run([sys.executable, "-m", "segswap.pipeline.show", str(coco.json_path), "--images",
                        str(coco.images_dir), "--out", str(out), "--n", "3"], capture_output=True, text=True,
                       timeout=SUBPROCESS_TIMEOUT, env=_env())
    assert r.returncode == 0, r.stderr
    sheet = load_rgb(out)
    assert sheet.shape[0] > 50 and sheet.std() > 10  # drawn, not blank


def test_show_user_errors_are_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "segswap.pipeline.show", str(tmp_path / "nope.json"), "--out",
                        str(tmp_path / "s.png")], capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT, env=_env())
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "nope.json" in r.stderr


# -------------------------------------------------------------------------------- image listing

def test_listing_names_directories_named_like_images_and_symlink_loops(tmp_path):
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(tmp_path / "good.png")
    (tmp_path / "x.jpg").mkdir()
    os.symlink("loop.png", tmp_path / "loop.png")  # points at itself
    os.symlink("gone.png", tmp_path / "dangling.png")
    (tmp_path / "sub").mkdir()
    os.symlink("..", tmp_path / "sub" / "up")  # a folder loop
    listing = list_images(tmp_path)
    assert [p.name for p in listing.files] == ["good.png"]
    reasons = {p.name: r for p, r in listing.skipped}
    assert "directory" in reasons["x.jpg"]
    assert "symlink loop" in reasons["loop.png"]
    assert "broken symlink" in reasons["dangling.png"]
    assert "symlink loop" in reasons["up"]


def test_segments_job_names_listing_skips_and_reads_non_utf8_names(tmp_path):
    from segswap.segments.unsupervised import run_extraction

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    raw = os.fsdecode(b"caf\xe9.png")  # Latin-1 bytes: not UTF-8
    img = np.zeros((96, 96, 3), np.uint8)
    img[20:70, 25:75] = rng.integers(100, 255, 3)
    Image.fromarray(img).save(folder / raw)
    (folder / "x.jpg").mkdir()
    out = run_extraction(folder, tmp_path / "s.json", work_side=64, min_side=16)
    prov = json.loads(out.read_text())["info"]["provenance"]
    coco = json.loads(out.read_text())
    assert [im["file_name"] for im in coco["images"]] == [raw]
    assert {"file_name": "x.jpg", "reason": "a directory, not an image file"} in prov["skipped"]
    assert prov["counters"]["skipped_by_reason"].get("directory") == 1


def test_discover_runs_on_non_utf8_file_names(tmp_path, monkeypatch):
    from toy_model import ToyMatcher, toy_scene

    from segswap.apps import cli_common, discover
    from segswap.apps.features_cache import FeatureCache

    rng = np.random.default_rng(3)
    patch = toy_scene(rng, (48, 32))
    folder = tmp_path / "imgs"
    folder.mkdir()
    names = [os.fsdecode(b"caf\xe9-%d.png" % i) for i in range(5)]  # Latin-1 bytes: not UTF-8
    for i, name in enumerate(names):
        spot = [(16, 16), (64, 48), (32, 80), (80, 16), (48, 64)][i]
        Image.fromarray(toy_scene(rng, (128, 128), patch if i < 4 else None, spot if i < 4 else None)).save(folder / name)
    model = ToyMatcher()
    monkeypatch.setattr(cli_common, "load", lambda args: (model, FeatureCache(model, tag="toy")))
    out = tmp_path / "out"
    assert discover.main([str(folder), "--ckpt", "unused", "--out", str(out), "--size", "128", "--top-k", "3",
                          "--n-eig", "4", "--clusters", "3", "--sheets", "1"]) == 0
    res = json.loads((out / "clusters.json").read_text())
    assert res["n_images"] == 5 and not res["skipped_images"]
    assert {r["image"] for r in res["clusters"][0]["regions"]} <= set(names)


# ----------------------------------------------------------------------------------- decoding memory

def test_rgba_decoding_peak_is_a_small_multiple_of_the_output(tmp_path):
    h, w = 1200, 1600
    rng = np.random.default_rng(0)
    rgba = rng.integers(0, 256, (h, w, 4), dtype=np.uint8)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png", compress_level=1)
    tracemalloc.start()
    try:
        out = load_rgb(tmp_path / "a.png")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    a = rgba[..., 3:4].astype(np.float64) / 255
    want = np.rint(rgba[..., :3] * a + 255 * (1 - a)).astype(np.uint8)
    assert np.array_equal(out, want)
    # numpy allocations while decoding (Pillow's own buffer is not traced): the output plus bands.
    assert peak < 2 * out.nbytes, (peak, out.nbytes)


# --------------------------------------------------------------------------------- user errors

def test_gen_user_errors_are_one_line_and_debug_shows_the_traceback(tmp_path):
    args = ["--segments", "coco", "--coco-annotations", str(tmp_path / "nope.json"), "--images", str(tmp_path),
            "--out", str(tmp_path / "o"), "--workers", "0"]
    r = _gen(args)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(_error_lines(r.stderr)) == 1 and "nope.json" in r.stderr
    r = _gen([*args, "--debug"])
    assert r.returncode == 2 and "Traceback" in r.stderr


# ------------------------------------------------------------------------------- Ray on loopback

def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(Path(f"/proc/{d}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = set(), [pid]
    while todo:
        p = todo.pop()
        out.add(p)
        todo += children.get(p, [])
    return out


def _listeners(pids: set[int]) -> list[tuple[str, int]]:
    """(local address, pid) of the TCP/UDP listening sockets held by ``pids`` (from ``ss -ltunpH``)."""
    r = subprocess.run(["ss", "-ltunpH"], capture_output=True, text=True, timeout=30)
    found = []
    for line in r.stdout.splitlines():
        fields = line.split()
        local = fields[4] if len(fields) > 4 else ""
        for pid in map(int, re.findall(r"pid=(\d+)", line)):
            if pid in pids:
                found.append((local, pid))
    return found


@pytest.mark.skipif(not shutil.which("ss"), reason="needs ss (iproute2)")
def test_segments_with_ray_workers_listens_on_loopback_only(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for i in range(12):
        img = rng.integers(0, 60, (160, 160, 3), dtype=np.uint8)
        img[30:110, 40:120] = rng.integers(120, 255, 3)
        Image.fromarray(img).save(folder / f"{i:02d}.png")
    proc = subprocess.Popen([sys.executable, "-m", "segswap.segments.cli", str(folder), "--out", str(tmp_path / "s.json"),
                             "--workers", "2", "--chunk-size", "1"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env={k: v for k, v in _env().items() if k != "RAY_ADDRESS"})
    seen: set[tuple[str, int]] = set()
    t0 = time.time()
    try:
        while proc.poll() is None and time.time() - t0 < SUBPROCESS_TIMEOUT:
            seen.update(_listeners(_descendants(proc.pid)))
            time.sleep(0.3)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert seen, "no listening socket of the Ray processes was observed"
    public = [(addr, pid) for addr, pid in seen if not _is_loopback(addr)]
    assert not public, f"listening beyond loopback: {public}"


def _is_loopback(addr: str) -> bool:
    """``127.0.0.1:80``, ``[::1]:80``, ``[::ffff:127.0.0.1]:80`` are; ``0.0.0.0:80``, ``*:80``, ``[::]:80`` not."""
    host = addr.rsplit(":", 1)[0].strip("[]").split("%")[0]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:  # "*" (every address) or a name
        return False
    mapped = getattr(ip, "ipv4_mapped", None)
    return ip.is_loopback or bool(mapped and mapped.is_loopback)
