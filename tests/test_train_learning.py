"""Learning checks (slow): a tiny model trained for a few hundred steps beats the untrained one on held-out pairs.

1. Synthetic shards (the same textured square in both images, see synthetic_shards.py) with a random
   backbone: needs neither the generator nor weights, and checks the trainer alone. Two negatives per
   four positives (the paper uses 15 per 5): with the paper's ratio the all-zero targets dominate the
   mask term and masks take far longer than a test's few hundred steps to cross 0.5.
2. Shards made by ``segswap-gen`` from its embedded photos, with unsupervised segments and Poisson
   blending: checks generator + loader + trainer together. A random trunk cannot do this one (on
   generator pairs a cell's nearest neighbour is its true match 15-25% of the time, below plain colour
   means), and pretrained weights are a user file; the trunk here is hand-built (handmade_trunk.py:
   blurred colour and oriented gradients, loaded through the real torchvision-layout loader), which
   makes true matches the nearest neighbour 56% of the time at 128 px. The generator runs with
   settings a weak descriptor can follow: one object, no rotation or anisotropic scale, no TPS paste,
   sources never enlarged (``max_fit_scale: 1``), no style.
"""
import json

import pytest
import yaml
from handmade_trunk import write_handmade_trunk
from synthetic_shards import write_synthetic_shards

from segswap.pipeline import cli as gen_cli
from segswap.train import cli


def _val_before_after(out):
    lines = [json.loads(line) for line in (out / "val.jsonl").read_text().splitlines()]
    return lines[0], lines[-1]


@pytest.mark.slow
def test_training_raises_held_out_iou(tmp_path):
    train = write_synthetic_shards(tmp_path / "train", n_shards=4, pairs_per_shard=16, size=128, seed=0)
    val = write_synthetic_shards(tmp_path / "val", n_shards=1, pairs_per_shard=24, size=128, seed=1, first_shard=9)
    out = tmp_path / "run"
    rc = cli.main(["--shards", train, "--val-shards", val, "--out", str(out), "--model", "tiny",
                   "--image-size", "128", "--batch-pos", "4", "--batch-neg", "2", "--max-steps", "400",
                   "--warmup-steps", "30", "--workers", "1", "--log-every", "50", "--val-every", "400",
                   "--val-pairs", "24", "--ckpt-every", "0", "--shuffle-buffer", "32"])
    assert rc == 0
    before, after = _val_before_after(out)
    assert before["step"] == 0 and after["step"] == 400
    assert after["iou"] > before["iou"] + 0.2, (before, after)
    assert after["corr_err_px"] < before["corr_err_px"]


GEN_STEPS = 1500


@pytest.mark.slow
def test_training_on_generator_shards_raises_held_out_iou(tmp_path):
    config = tmp_path / "gen.yaml"
    config.write_text(yaml.safe_dump({"render": {
        "rotation_deg": [0.0, 0.0], "scale_range": [1.0, 1.0], "p_tps": 0.0, "p_border_crop": 0.0,
        "max_fit_scale": 1.0}}))
    common = ["--config", str(config), "--size", "128", "--p-two-object", "0", "--style", "none",
              "--no-ray", "--workers", "0", "--pairs-per-shard", "32", "-q"]
    train, val = tmp_path / "train", tmp_path / "val"
    # Unsupervised segments of the embedded photos, extracted once, then reused for the held-out pairs.
    assert gen_cli.main(common + ["--num-shards", "16", "--seed", "0", "--out", str(train)]) == 0
    assert gen_cli.main(common + ["--segments", "coco", "--coco-annotations", str(train / "segments.json"),
                                  "--images", str(train / "embedded-images"),
                                  "--num-shards", "2", "--seed", "1", "--out", str(val)]) == 0
    trunk = write_handmade_trunk(tmp_path / "trunk.pth")
    out = tmp_path / "run"
    rc = cli.main(["--shards", str(train / "train-{000000..000015}.tar"),
                   "--val-shards", str(val / "train-{000000..000001}.tar"), "--out", str(out),
                   "--backbone-weights", trunk, "--model", "tiny", "--image-size", "128",
                   "--batch-pos", "4", "--batch-neg", "2", "--max-steps", str(GEN_STEPS), "--warmup-steps", "30",
                   "--workers", "1", "--log-every", "100", "--val-every", str(GEN_STEPS), "--val-pairs", "64",
                   "--ckpt-every", "0", "--shuffle-buffer", "64"])
    assert rc == 0
    before, after = _val_before_after(out)
    assert before["step"] == 0 and after["step"] == GEN_STEPS
    assert after["iou"] > before["iou"] + 0.1, (before, after)
    assert after["corr_err_px"] < 0.7 * before["corr_err_px"], (before, after)
    assert after["fg_mask"] > 2 * after["neg_mask"], (before, after)  # masks light up on repeats, not everywhere
