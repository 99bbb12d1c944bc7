"""The shipped recipes run as written and learn: a small slice, so the figures are not their full-run ones
(benchmarks/README.md has those)."""

import json

import pytest
import yaml
from conftest import ROOT, run_module


@pytest.mark.slow
def test_fast_recipe_learns_on_a_small_slice(mnist, tmp_path):
    # 1,280 images, 160 steps of 8: the recipe's settings, its warm-up scaled down to the shorter run
    out = tmp_path / "run"
    result = run_module("toolkit.train", "--config", str(ROOT / "configs" / "fast.yaml"), "--train-samples", "1280",
                        "--warmup-steps", "20", "--eval-every-steps", "80", "--eval-samples", "500",
                        "--log-every-steps", "20", "--output-dir", str(out), timeout=900)
    assert result.returncode == 0, result.stdout + result.stderr
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [80, 160]
    used = yaml.safe_load((out / "config.yaml").read_text())
    assert (used["image_size"], used["batch_size"], used["lr_schedule"]) == (65, 8, "linear")  # the file's
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert records[-1]["eval_loss"] < records[0]["eval_loss"] < 2.3  # ln 10: a model that knows nothing
    assert records[-1]["eval_accuracy"] >= 0.35, records  # chance is 0.1; the full recipe reaches 96% by step 608
    assert records[-1]["eval_count"] == 500

