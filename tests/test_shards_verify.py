"""`segswap-shards verify` catches damaged shards and names the shard and the sample."""
import io
import os
import shutil
import tarfile

import numpy as np
import pytest
from synthetic_shards import make_pair

from segswap.shards import cli
from segswap.shards.format import encode_sample, sample_key
from segswap.shards.index import rebuild
from segswap.shards.writer import ShardWriter


@pytest.fixture(scope="module")
def good_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("good")
    rng = np.random.default_rng(1)
    for s in range(2):
        with ShardWriter(out / ("train-%06d.tar" % s)) as w:
            for i in range(3):
                w.write(make_pair(rng, sample_key(s, i), size=64, min_side=48, stylised=False))
    rebuild(str(out))
    return out


def _copy(good_dir, tmp_path):
    out = tmp_path / "ds"
    shutil.copytree(good_dir, out)
    return out


def _run(out, *extra, capsys):
    code = cli.main(["verify", str(out), "-q", *extra])
    return code, capsys.readouterr()


def test_good_dataset_verifies(good_dir, capsys):
    code, cap = _run(good_dir, capsys=capsys)
    assert code == 0, cap.err
    assert "6 samples verified" in cap.out


def test_flipped_byte_is_caught_by_md5(good_dir, tmp_path, capsys):
    out = _copy(good_dir, tmp_path)
    path = out / "train-000001.tar"
    data = bytearray(path.read_bytes())
    data[2000] ^= 0xFF
    path.write_bytes(bytes(data))
    code, cap = _run(out, capsys=capsys)
    assert code == 1
    assert "train-000001.tar" in cap.err and "md5" in cap.err


def _rewrite(path, edit):
    """Rewrite a shard through `edit(key, fields) -> fields`, keeping the rest identical."""
    samples, order = {}, []
    with tarfile.open(path) as tar:
        for m in tar:
            key, field = m.name.split(".", 1)
            if key not in samples:
                order.append(key)
                samples[key] = {}
            samples[key][field] = tar.extractfile(m).read()
    with ShardWriter(path) as w:
        for key in order:
            w.write({"__key__": key, **edit(key, samples[key])})


def test_dropped_field_names_shard_and_sample(good_dir, tmp_path, capsys):
    out = _copy(good_dir, tmp_path)
    _rewrite(out / "train-000000.tar",
             lambda k, f: {n: v for n, v in f.items() if not (k == "000000-000001" and n == "mask1.png")})
    rebuild(str(out), rehash=True)  # the index agrees with the damaged file: only the format check can tell
    code, cap = _run(out, capsys=capsys)
    assert code == 1
    assert "train-000000.tar: sample 000000-000001" in cap.err and "mask1.png" in cap.err


def test_inconsistent_flow_is_caught(good_dir, tmp_path, capsys):
    out = _copy(good_dir, tmp_path)

    def zero_flow(key, fields):
        if key == "000001-000002":
            bio = io.BytesIO()
            np.save(bio, np.zeros((16, 16, 2), np.float16))  # finite everywhere, masks are not
            fields = {**fields, "flow01.npy": bio.getvalue()}
        return fields

    _rewrite(out / "train-000001.tar", zero_flow)
    rebuild(str(out), rehash=True)
    code, cap = _run(out, "--all", capsys=capsys)
    assert code == 1
    assert "sample 000001-000002" in cap.err and "disagree" in cap.err


def test_truncated_tar_is_caught(good_dir, tmp_path, capsys):
    out = _copy(good_dir, tmp_path)
    path = out / "train-000000.tar"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    rebuild(str(out), rehash=True)
    code, cap = _run(out, capsys=capsys)
    assert code == 1
    assert "train-000000.tar" in cap.err and ("tar" in cap.err or "truncated" in cap.err)


def test_missing_shard_and_min_cells(good_dir, tmp_path, capsys):
    out = _copy(good_dir, tmp_path)
    os.remove(out / "train-000001.tar")
    code, cap = _run(out, capsys=capsys)
    assert code == 1 and "listed in index.json but missing" in cap.err
    rebuild(str(out))
    code, cap = _run(out, "--min-cells", "1000", capsys=capsys)
    assert code == 1 and "grid cells < 1000" in cap.err


def test_index_rebuild_after_unindexed_shard(good_dir, tmp_path, capsys):
    out = _copy(good_dir, tmp_path)
    rng = np.random.default_rng(5)
    with ShardWriter(out / "train-000002.tar") as w:
        w.write(encode_sample(make_pair(rng, sample_key(2, 0), size=64, min_side=48, stylised=False)))
    code, cap = _run(out, capsys=capsys)
    assert code == 1 and "not listed in index.json" in cap.err
    assert cli.main(["index", str(out)]) == 0
    code, cap = _run(out, capsys=capsys)
    assert code == 0, cap.err


def test_sample_in_the_wrong_shard_is_caught(good_dir, tmp_path, capsys):
    out = _copy(good_dir, tmp_path)
    os.replace(out / "train-000001.tar", out / "train-000007.tar")
    rebuild(str(out), rehash=True)
    code, cap = _run(out, capsys=capsys)
    assert code == 1 and "train-000007.tar: sample 000001-000000" in cap.err and "shard's id" in cap.err
