"""A real training run on a small MNIST subset, and what it leaves in its run folder."""

import json
from pathlib import Path

import pytest
from conftest import SMALL_RUN, run_module
from safetensors.torch import load_file

from toolkit.model import AlexNet

TAGS = {"train/loss", "train/lr", "perf/images_per_sec", "eval/loss", "eval/accuracy"}


@pytest.fixture(scope="module")
def trained(small_run):
    return small_run


@pytest.mark.slow
def test_learns_well_beyond_chance(trained):
    out, _ = trained
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[-1]["eval_count"] == 1000
    assert records[-1]["eval_accuracy"] >= 0.80, records
    assert records[-1]["train_loss"] < records[0]["train_loss"]
    assert all(r["images_per_sec"] > 0 for r in records)


@pytest.mark.slow
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


@pytest.mark.slow
def test_run_folder_holds_config_and_safetensors_weights_per_epoch(trained):
    out, _ = trained
    assert "image_size: 65" in (out / "config.yaml").read_text()
    checkpoints = sorted((out / "checkpoints").iterdir())
    best = max(json.loads(line)["eval_accuracy"] for line in (out / "metrics.jsonl").read_text().splitlines())
    best_step = next(r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
                     if r["eval_accuracy"] == best)
    # the newest, and the best kept apart (the same one when the last evaluation was the best)
    assert [p.name for p in checkpoints] == sorted({f"step-{best_step:08d}", "step-00000126"})
    for folder in checkpoints:
        assert (folder / "config.yaml").is_file() and (folder / "COMPLETE").is_file()
        weights = load_file(folder / "model.safetensors")
        assert set(weights) == set(AlexNet().state_dict())
    assert not list(out.rglob("*.pth"))


@pytest.mark.slow
def test_console_without_a_terminal_is_plain_lines(trained):
    _, result = trained
    out = result.stdout
    assert "\x1b[" not in out  # no control codes in logs
    assert "epoch 1/2 step 10/63 loss" in out
    assert "epoch 2/2 done: train loss" in out
    assert "precision: bf16 autocast, fp32 weights (auto for cpu)" in out or "precision: fp32 (auto for cpu)" in out
    assert "parameters: 46,764,746" in out
    config_line = next(line for line in out.splitlines() if line.startswith("config: "))
    assert "data_dir=" in config_line and "resume=" in config_line  # one line however long: never wrapped


@pytest.mark.slow
def test_existing_run_folder_is_never_overwritten(trained):
    out, _ = trained
    before = (out / "metrics.jsonl").read_text()
    result = run_module("toolkit.train", *SMALL_RUN, "--output-dir", str(out))
    assert result.returncode == 2
    assert "already holds a run: pass --resume auto" in result.stderr
    assert (out / "metrics.jsonl").read_text() == before


@pytest.mark.slow
def test_missing_data_is_one_line_and_exit_1(tmp_path):
    result = run_module("toolkit.train", "--data-dir", str(tmp_path), "--no-download",
                        "--output-dir", str(tmp_path / "run"))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "train-images-idx3-ubyte" in lines[0] and str(tmp_path / "MNIST" / "raw") in lines[0]


# --- stopping early, profiling, trackers: tiny runs through the command line ---

TINY_RUN = ["--image-size", "65", "--train-samples", "320", "--eval-samples", "200", "--batch-size", "32",
            "--warmup-steps", "2", "--log-every-steps", "2", "--epochs", "3"]


def records_of(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_target_accuracy_stops_with_a_checkpoint_and_the_time_it_took(mnist, tmp_path):
    out = tmp_path / "run"
    result = run_module("toolkit.train", *TINY_RUN, "--epochs", "6", "--ema-decay", "0", "--eval-every-steps", "4",
                        "--target-accuracy", "0.3", "--profile-steps", "2:3", "--output-dir", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    records = records_of(out)
    last = records[-1]
    assert last["eval_accuracy"] >= 0.3 and all(r["eval_accuracy"] < 0.3 for r in records[:-1])
    assert last["step"] < 60  # stopped at the evaluation that reached it, before the end
    assert last["time_to_target_s"] == last["train_seconds"] > 0
    assert last["wall_time_to_target_s"] >= last["time_to_target_s"]
    assert last["images_to_target"] == last["step"] * 32
    assert f"reached the target accuracy 30.00% at step {last['step']}" in result.stdout
    assert "time to 30.0%:" in result.stdout and "training time:" in result.stdout
    assert (out / "checkpoints" / f"step-{last['step']:08d}" / "COMPLETE").is_file()
    # the profile of steps 2-3: a Chrome/Perfetto trace naming the convolution kernels, and the top operators
    (trace,) = (out / "profile").glob("trace-steps-2-3.json")
    names = {event.get("name", "") for event in json.loads(trace.read_text())["traceEvents"]}
    assert any("convolution" in name for name in names)
    assert "top operators by self time" in result.stdout and "aten::convolution_backward" in result.stdout


@pytest.mark.slow
def test_tensorboard_shows_where_the_time_goes(small_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, result = small_run
    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"perf/data_ms_per_step", "perf/step_ms", "perf/tflops", "perf/mfu", "memory/peak_gib"} <= scalars
    assert all(0 < e.value < 1 for e in events.Scalars("perf/mfu"))
    # each evaluation's confusion matrix and misclassified digits, as pictures
    assert {"eval/confusion", "eval/misclassified"} <= set(events.Tags()["images"])
    assert len(events.Images("eval/confusion")) == 2
    assert " data " in result.stdout and "TFLOP/s" in result.stdout


@pytest.mark.slow
def test_early_stopping_after_evaluations_without_improvement(mnist, tmp_path):
    out = tmp_path / "run"
    # a learning rate too small to change any prediction (with random last-layer weights: the recommended init
    # starts with all logits at zero, where the tiniest step changes the argmax): every evaluation equals the first
    result = run_module("toolkit.train", *TINY_RUN, "--lr", "1e-12", "--init", "default", "--ema-decay", "0",
                        "--eval-every-steps", "2", "--early-stop-patience", "2", "--output-dir", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert [r["step"] for r in records_of(out)] == [2, 4, 6]
    assert "stopped early at step 6: no better accuracy in the last 2 evaluations" in result.stdout


@pytest.mark.slow
def test_time_limit_stops_with_a_checkpoint_and_says_how_to_resume(mnist, tmp_path):
    out = tmp_path / "run"
    # one second leaves no room for a checkpoint (0.75 GB): the run stops after its first step
    result = run_module("toolkit.train", *TINY_RUN, "--time-limit", "1s", "--output-dir", str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"stopped at step 1 before the time limit (1s); resume with --resume auto --output-dir {out}" \
        in result.stdout
    assert (out / "checkpoints" / "step-00000001" / "COMPLETE").is_file()
    resumed = run_module("toolkit.train", *TINY_RUN, "--max-steps", "3", "--resume", "auto", "--output-dir", str(out))
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert (out / "checkpoints" / "step-00000003" / "COMPLETE").is_file()


def test_a_tracker_that_is_not_installed_is_one_line(tmp_path, capsys):
    from toolkit.train import main

    with pytest.raises(SystemExit) as exit_info:
        main(["--log-with", "tensorboard,clearml", "--output-dir", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == ["toolkit.train: error: log_with: clearml is not installed: pip install clearml (or log with "
                     "another tracker, e.g. --log-with tensorboard)"]
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_smoke_runs_the_whole_pipeline_in_seconds_and_keeps_nothing(mnist, tmp_path):
    result = run_module("toolkit.train", "--smoke", "--device", "cpu", timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    last = result.stdout.strip().splitlines()[-1]
    assert last.startswith("smoke test passed in ") and last.endswith(
        "4 steps, an evaluation, a checkpoint written and read back (nothing kept)")
    folder = next(line for line in result.stdout.splitlines() if line.startswith("run folder: "))[len("run folder: "):]
    assert not Path(folder).exists()
