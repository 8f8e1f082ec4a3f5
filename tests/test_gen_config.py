"""segswap-gen options: precedence, validation and how shards are split between tasks."""
import pytest

from segswap.pipeline.config import (
    DEFAULTS,
    ConfigError,
    dataset_config,
    get_parser,
    resolve,
    selected_shards,
)


def _cfg(argv, tmp_path=None):
    return resolve(vars(get_parser().parse_args(argv)))


def test_defaults_and_flags():
    cfg = _cfg([])
    assert cfg["segments"] == "unsupervised" and cfg["out"] == DEFAULTS["out"] and cfg["workers"] >= 1
    cfg = _cfg(["--out", "x", "--seed", "7", "--blend", "cv2", "--style-strength", "0.2:0.8", "--no-ray"])
    assert (cfg["out"], cfg["seed"], cfg["blend"], cfg["style_strength"], cfg["workers"]) == ("x", 7, "cv2", [0.2, 0.8], 0)


def test_yaml_then_flags_override(tmp_path):
    path = tmp_path / "gen.yaml"
    path.write_text("seed: 3\npairs-per-shard: 5\nrender:\n  p_tps: 0.1\nunsupervised:\n  max_boxes: 4\n")
    cfg = _cfg(["--config", str(path), "--seed", "4", "--box-quantile", "0.8"])
    assert cfg["seed"] == 4 and cfg["pairs_per_shard"] == 5 and cfg["render"] == {"p_tps": 0.1}
    assert cfg["unsupervised"] == {"max_boxes": 4, "box_quantile": 0.8}


@pytest.mark.parametrize("text,match", [
    ("sed: 3\n", "unknown key"),
    ("seed: three\n", "seed: must be an integer"),
    ("size: 100\n", "multiple of 16"),
    ("- a\n", "mapping"),
    ("unsupervised:\n  box_quantil: 0.3\n", "box_quantil"),
    ("seed: [\n", "not valid YAML"),
])
def test_bad_config_files_name_file_and_key(tmp_path, text, match):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match) as err:
        _cfg(["--config", str(path)])
    assert "bad.yaml" in str(err.value)


@pytest.mark.parametrize("argv,match", [
    (["--shard-range", "5"], "A:B"),
    (["--shard-range", "4:2"], "A <= B"),
    (["--task-index", "1"], "go together"),
    (["--task-index", "3", "--num-tasks", "3"], "task_index < num_tasks"),
    (["--shard-range", "0:2", "--task-index", "0", "--num-tasks", "2"], "not both"),
    (["--style-strength", "0.9:0.1"], "LO <= HI"),
    (["--p-two-object", "1.5"], r"\[0, 1\]"),
    (["--style-device", "gpu"], "cpu, auto, cuda or cuda:N"),
    (["--style", "none", "--style-device", "cpu"], "runs no styliser"),
    (["--style-device", "cuda:1"], "magenta runs on cpu or cuda"),
    (["--style-scale", "0"], r"in \(0, 1\]"),
    (["--style-scale", "1.5"], r"in \(0, 1\]"),
    (["--style", "adain", "--style-scale", "0.5"], "built-in styles"),
    (["--style-images", "paintings", "--style-scale", "0.5"], "built-in styles"),
    (["--style", "none", "--style-engine", "onnxruntime"], "built-in styles"),
    (["--style-images", "paintings", "--style-engine", "openvino"], "built-in styles"),
    (["--style-device", "cuda", "--style-engine", "openvino"], "openvino runs on the CPU"),
])
def test_bad_flags(argv, match):
    with pytest.raises(ConfigError, match=match):
        _cfg(argv)


def test_task_slices_cover_every_shard_once():
    for n in (0, 1, 7, 10):
        for tasks in (1, 3, 4):
            ids = [s for i in range(tasks)
                   for s in selected_shards(_cfg(["--num-shards", str(n), "--task-index", str(i), "--num-tasks", str(tasks)]))]
            assert ids == list(range(n))
    assert selected_shards(_cfg(["--shard-range", "3:6"])) == [3, 4, 5]


def test_run_options_do_not_change_the_dataset_config():
    a = dataset_config(_cfg(["--workers", "4", "--out", "a", "--shard-range", "0:2"]))
    b = dataset_config(_cfg(["--no-ray", "--out", "b", "--num-shards", "99"]))
    assert a == b
    assert dataset_config(_cfg(["--seed", "1"])) != a


def test_style_scale_reaches_the_styliser(tmp_path):
    """--style-scale goes into the job and the dataset config (the parts of a dataset must agree on it)
    and into the built-in styles' network; left out, the styliser keeps its default."""
    from segswap.pipeline.run import make_job
    from segswap.pipeline.style import build_styliser
    from segswap.pipeline.style_magenta import DEFAULT_WORK_SCALE

    default = make_job(_cfg(["--out", str(tmp_path)]), str(tmp_path / "s.json"), str(tmp_path))
    half = make_job(_cfg(["--out", str(tmp_path), "--style-scale", "0.5"]), str(tmp_path / "s.json"), str(tmp_path))
    assert half["styliser"]["work_scale"] == 0.5 and half["fingerprint"] != default["fingerprint"]
    assert dataset_config(_cfg(["--style-scale", "0.5"])) != dataset_config(_cfg([]))  # parts must agree on it
    assert build_styliser(half["style"], **half["styliser"]).work_scale == 0.5
    assert build_styliser(default["style"], **default["styliser"]).work_scale == DEFAULT_WORK_SCALE


def test_style_engine_reaches_the_styliser(tmp_path):
    """--style-engine goes into the job and the dataset config, and decides what runs the network."""
    from segswap.nets.magenta import MULTISTYLE_MODEL
    from segswap.pipeline.run import make_job
    from segswap.pipeline.style import build_styliser

    job = make_job(_cfg(["--out", str(tmp_path), "--style-engine", "onnxruntime"]), str(tmp_path / "s.json"),
                   str(tmp_path))
    assert job["styliser"]["engine"] == "onnxruntime"
    assert dataset_config(_cfg(["--style-engine", "onnxruntime"])) != dataset_config(_cfg([]))
    styliser = build_styliser(job["style"], **job["styliser"])
    assert styliser.networks.engines[MULTISTYLE_MODEL] == "onnxruntime"
