"""A real training run on a small MNIST subset, and what it leaves in its run folder."""

import json

import pytest
from conftest import SMALL_RUN, run_module
from safetensors.torch import load_file

from toolkit.model import AlexNet

TAGS = {"train/loss", "train/lr", "perf/images_per_sec", "eval/loss", "eval/accuracy"}


@pytest.fixture(scope="module")
def trained(small_run):
    return small_run


def test_learns_well_beyond_chance(trained):
    out, _ = trained
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[-1]["eval_count"] == 1000
    assert records[-1]["eval_accuracy"] >= 0.80, records
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert all(r["images_per_sec"] > 0 for r in records)


def test_tensorboard_has_one_event_file_with_the_documented_tags(trained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = trained
    files = list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 1
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    assert TAGS <= set(events.Tags()["scalars"])
    assert "config/text_summary" in events.Tags()["tensors"]
    steps = [e.step for e in events.Scalars("train/loss")]
    assert steps == sorted(set(steps)) and steps[0] == 10
    accuracy = [e.value for e in events.Scalars("eval/accuracy")]
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert accuracy == pytest.approx([r["eval_accuracy"] for r in records])


def test_run_folder_holds_config_and_safetensors_weights_per_epoch(trained):
    out, _ = trained
    assert "image_size: 65" in (out / "config.yaml").read_text()
    checkpoints = sorted((out / "checkpoints").iterdir())
    assert [p.name for p in checkpoints] == ["step-00000063", "step-00000126"]
    for folder in checkpoints:
        assert (folder / "config.yaml").is_file() and (folder / "COMPLETE").is_file()
        weights = load_file(folder / "model.safetensors")
        assert set(weights) == set(AlexNet().state_dict())
    assert not list(out.rglob("*.pth"))


def test_console_without_a_terminal_is_plain_lines(trained):
    _, result = trained
    out = result.stdout
    assert "\x1b[" not in out  # no control codes in logs
    assert "epoch 1/2 step 10/63 loss" in out
    assert "epoch 2/2 done: train loss" in out
    assert "precision: bf16" in out or "precision: no" in out
    assert "parameters: 46,764,746" in out
    config_line = next(line for line in out.splitlines() if line.startswith("config: "))
    assert "data_dir=" in config_line and "resume=" in config_line  # one line however long: never wrapped


def test_existing_run_folder_is_never_overwritten(trained):
    out, _ = trained
    before = (out / "metrics.jsonl").read_text()
    result = run_module("toolkit.train", *SMALL_RUN, "--output-dir", str(out))
    assert result.returncode == 2
    assert "already holds a run: pass --resume auto" in result.stderr
    assert (out / "metrics.jsonl").read_text() == before


def test_missing_data_is_one_line_and_exit_1(tmp_path):
    result = run_module("toolkit.train", "--data-dir", str(tmp_path), "--no-download",
                        "--output-dir", str(tmp_path / "run"))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "train-images-idx3-ubyte" in lines[0] and str(tmp_path / "MNIST" / "raw") in lines[0]
