"""Shard writer -> reader round trips, deterministic bytes, index and manifest contents."""
import json
import os

import numpy as np
import pytest
from synthetic_shards import make_pair

from segswap.shards import index as shard_index
from segswap.shards.format import FormatError, sample_key
from segswap.shards.reader import iter_pairs, shard_urls
from segswap.shards.writer import ShardWriter, write_shard


def _pairs(shard_id, n, seed=0, stylised=True):
    rng = np.random.default_rng(seed)
    return [make_pair(rng, sample_key(shard_id, i), size=64, min_side=48, stylised=stylised) for i in range(n)]


def test_round_trip_keeps_every_field(tmp_path):
    pairs = _pairs(0, 3)
    path = tmp_path / "train-000000.tar"
    assert write_shard(path, pairs) == 3
    back = list(iter_pairs(str(path)))
    assert [p.key for p in back] == [p.key for p in pairs]
    for a, b in zip(pairs, back):
        np.testing.assert_array_equal(a.mask0, b.mask0)
        np.testing.assert_array_equal(a.mask1, b.mask1)
        np.testing.assert_array_equal(a.flow01, b.flow01)  # float16 stored exactly, NaNs included
        np.testing.assert_array_equal(a.flow10, b.flow10)
        assert b.flow01.dtype == np.float16
        for name in ("img0", "img1", "sty0", "sty1"):  # JPEG: close, not equal
            assert np.abs(getattr(a, name).astype(int) - getattr(b, name)).mean() < 12
        assert b.meta["key"] == a.key and b.meta["format_version"] == 1


def test_without_style_no_sty_fields(tmp_path):
    path = tmp_path / "train-000000.tar"
    write_shard(path, _pairs(0, 2, stylised=False))
    back = list(iter_pairs(str(path)))
    assert all(p.sty0 is None and p.sty1 is None for p in back)


def test_same_pairs_give_identical_bytes(tmp_path):
    a, b = tmp_path / "a" / "train-000000.tar", tmp_path / "b" / "train-000000.tar"
    write_shard(a, _pairs(0, 2))
    write_shard(b, _pairs(0, 2))
    assert a.read_bytes() == b.read_bytes()


def test_brace_list_directory_and_pipe_urls(tmp_path):
    for s in range(3):
        write_shard(tmp_path / ("train-%06d.tar" % s), _pairs(s, 2, seed=s))
    brace = str(tmp_path / "train-{000000..000002}.tar")
    keys = [p.key for p in iter_pairs(brace)]
    assert keys == [sample_key(s, i) for s in range(3) for i in range(2)]
    assert [p.key for p in iter_pairs(str(tmp_path))] == keys
    assert len(shard_urls(str(tmp_path))) == 3
    shard_index.write_index(str(tmp_path))
    assert [p.key for p in iter_pairs(str(tmp_path / "index.json"))] == keys
    pipe = f"pipe:cat {tmp_path / 'train-000001.tar'}"
    assert [p.key for p in iter_pairs(pipe)] == keys[2:4]


def test_failed_write_leaves_nothing(tmp_path):
    path = tmp_path / "train-000000.tar"
    with pytest.raises(RuntimeError):
        with ShardWriter(path) as w:
            w.write(_pairs(0, 1)[0])
            raise RuntimeError("renderer crashed")
    assert os.listdir(tmp_path) == []


def test_reader_refuses_unknown_member(tmp_path):
    path = tmp_path / "train-000000.tar"
    sample = {"__key__": "000000-000000", "img0.jpg": b"x", "evil.pyd": b"\x80\x04K\x01."}
    with ShardWriter(path) as w:
        w.write(sample)
    with pytest.raises(FormatError, match="unknown field"):
        list(iter_pairs(str(path)))


def test_index_and_manifest_merge(tmp_path):
    out = str(tmp_path)
    for s in range(2):
        write_shard(os.path.join(out, "train-%06d.tar" % s), _pairs(s, 2 + s, seed=s))
    entry = shard_index.shard_entry(os.path.join(out, "train-000001.tar"))
    shard_index.write_part(out, "shards-000000-000001", {
        "config": {"seed": 3}, "root_seed": 3, "wall_time_s": 1.5, "finished_unix": 1,
        "shards": {"train-000000.tar": {"attempts": 3, "skips": {"too_small": 1}}}})
    shard_index.write_part(out, "shards-000001-000002", {
        "config": {"seed": 3}, "root_seed": 3, "wall_time_s": 2.0, "finished_unix": 2,
        "shards": {"train-000001.tar": {"attempts": 5, "skips": {"too_small": 1, "overlap": 1},
                                        "entry": entry}}})
    index, manifest = shard_index.rebuild(out)
    assert index["__kind__"] == "wids-shard-index-v1"
    assert [(e["url"], e["nsamples"]) for e in index["shardlist"]] == [("train-000000.tar", 2),
                                                                        ("train-000001.tar", 3)]
    assert index["shardlist"][1]["md5sum"] == entry["md5sum"]
    assert manifest["counts"]["pairs"] == 5 and manifest["counts"]["attempts"] == 8
    assert manifest["skips"] == {"overlap": 1, "too_small": 2}
    assert manifest["wall_time_s"] == 3.5 and manifest["root_seed"] == 3
    on_disk = json.loads((tmp_path / "manifest.json").read_text())
    assert on_disk == json.loads(json.dumps(manifest))
    assert not [n for n in os.listdir(out) if n.endswith(".tmp")]
