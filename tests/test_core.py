"""segswap.core on its own: atomic writes, the config mechanism, progress and skip naming, the layer rule."""
import ast
import io
import json
import logging
import os
from pathlib import Path

import pytest

from segswap.core.atomic import atomic_open, atomic_write, atomic_write_json
from segswap.core.config import ConfigError, load_config
from segswap.core.logs import Progress, SkipLog, collect_example

ROOT = Path(__file__).resolve().parents[1]


def _files(folder) -> list[str]:
    return sorted(os.listdir(folder))


def test_atomic_write_leaves_only_the_final_file(tmp_path):
    atomic_write(tmp_path / "a.txt", "hello")
    atomic_write_json(tmp_path / "b.json", {"x": 1})
    assert (tmp_path / "a.txt").read_text() == "hello" and json.loads((tmp_path / "b.json").read_text()) == {"x": 1}
    assert _files(tmp_path) == ["a.txt", "b.json"]


def test_atomic_open_keeps_the_old_file_and_no_temporary_on_error(tmp_path):
    atomic_write(tmp_path / "a.txt", "old")
    with pytest.raises(RuntimeError), atomic_open(tmp_path / "a.txt", "w") as f:
        f.write("half")
        raise RuntimeError("disk went away")
    assert (tmp_path / "a.txt").read_text() == "old" and _files(tmp_path) == ["a.txt"]


def test_config_defaults_yaml_flags_and_unknown_keys(tmp_path):
    defaults = {"seed": 0, "optim": {"lr": 1e-3, "betas": [0.5, 0.9]}, "free": {}}
    path = tmp_path / "c.yaml"
    path.write_text("seed: 3\noptim:\n  lr: 0.1\nfree:\n  anything-goes: 1\n")
    cfg = load_config(defaults, path, {"optim.lr": 0.2, "seed": None}, open_sections={("free",)})
    assert cfg == {"seed": 3, "optim": {"lr": 0.2, "betas": [0.5, 0.9]}, "free": {"anything_goes": 1}}
    assert defaults["optim"]["lr"] == 1e-3  # the table of defaults is not modified
    path.write_text("optim:\n  learning_rate: 0.1\n")
    with pytest.raises(ConfigError, match=r"c.yaml: unknown key 'optim.learning_rate' \(known at this level: betas, lr\)"):
        load_config(defaults, path)
    with pytest.raises(ConfigError, match="unknown option 'optim.momentum'"):
        load_config(defaults, None, {"optim.momentum": 0.9})
    path.write_text("optim: 3\n")
    with pytest.raises(ConfigError, match="'optim' must be a mapping"):
        load_config(defaults, path)


def test_progress_logs_lines_off_a_terminal_and_draws_a_bar_on_one(caplog):
    with caplog.at_level(logging.INFO):
        p = Progress(3, desc="shards", unit="pairs", tty=False, log_every_s=3600, logger=logging.getLogger("t"))
        for _ in range(3):
            p.update(1, count=4)
        p.close()
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [lines[-1]] and "3/3 shards, 12 pairs" in lines[-1]  # only the final state, rate-limited
    stream = io.StringIO()
    bar = Progress(4, desc="queries", tty=True, stream=stream)
    for done in range(1, 5):
        bar(done, 4)
    assert "4/4" in stream.getvalue() and "\r" in stream.getvalue()


def test_skiplog_names_the_first_few_per_reason_then_counts(caplog):
    log = SkipLog(logging.getLogger("t"), "skipped", examples=2)
    examples = {}
    for i in range(5):
        collect_example(examples, "bad_image", f"file {i}", limit=3)
    with caplog.at_level(logging.WARNING):
        log.add({"bad_image": 5}, examples)
        log.skip("tiny", "t.png")
    named = [r.getMessage() for r in caplog.records]
    assert named == ["skipped (bad_image): file 0", "skipped (bad_image): file 1 (further ones are only counted)",
                     "skipped (tiny): t.png"]
    assert log.summary() == {"bad_image": 5, "tiny": 1}


def test_core_imports_nothing_else_from_segswap():
    for py in (ROOT / "core").glob("*.py"):
        for node in ast.walk(ast.parse(py.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else \
                [a.name for a in node.names] if isinstance(node, ast.Import) else []
            for name in names:
                assert not name.startswith("segswap.") or name.startswith("segswap.core"), f"{py.name}: {name}"


LAYER = {"core": 0, "shards": 1, "nets": 1, "segments": 2, "pipeline": 2, "train": 2, "apps": 3}


def test_imports_only_point_down_and_the_halves_stay_apart():
    for folder, level in LAYER.items():
        for py in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(py.read_text())):
                names = [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else \
                    [a.name for a in node.names] if isinstance(node, ast.Import) else []
                for name in names:
                    parts = name.split(".")
                    if parts[0] != "segswap" or len(parts) < 2 or parts[1] not in LAYER:
                        continue
                    target = parts[1]
                    where = f"{py.relative_to(ROOT)} imports {name}"
                    assert LAYER[target] <= level, where
                    assert {folder, target} != {"pipeline", "train"}, where


def _signal_seen_through_native_code():
    """What numba's compiled code does when the signal handler raises inside a Python callback of
    its: the Interrupted comes back as a SystemError."""
    import signal
    import time

    from segswap.core.ray_driver import Interrupted

    try:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises here, at once
    except Interrupted as e:
        raise SystemError("CPUDispatcher(<function _pcg>) returned a result with an exception set") from e
    raise AssertionError("no signal arrived")


def test_a_signal_turned_into_another_error_still_stops_the_batch():
    import signal

    from segswap.core.ray_driver import Interrupted, interruptible, raise_if_interrupted

    skipped = []
    with pytest.raises(Interrupted) as caught, interruptible():
        for _ in range(3):
            try:
                _signal_seen_through_native_code()
            except Exception:  # noqa: BLE001 - the shard loop's "renderer error: count and go on"
                raise_if_interrupted()
                skipped.append(1)
    assert caught.value.signum == signal.SIGTERM and not skipped
    # An error of another kind leaving the block after the signal is the interruption, too.
    with pytest.raises(Interrupted), interruptible():
        _signal_seen_through_native_code()
    raise_if_interrupted()  # outside a block nothing is pending
    with interruptible():
        raise_if_interrupted()
