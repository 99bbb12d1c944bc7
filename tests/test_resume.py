"""Kill a real training run at awkward moments and resume it: the result must be the run it would have been.

The runs are tiny (64 images at 65 px, batch 16: 4 steps per epoch, 2 epochs) and checkpoint every step.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import ROOT, mnist_root, run_module, scratch_dir
from safetensors.torch import load_file

from toolkit.config import TrainConfig

RUN = ["--image-size", "65", "--train-samples", "64", "--eval-samples", "100", "--batch-size", "16",
       "--epochs", "2", "--warmup-steps", "2", "--log-every-steps", "1", "--checkpoint-every-steps", "1",
       "--keep-last", "2", "--seed", "3"]
STEPS = 8

pytestmark = pytest.mark.skipif(mnist_root() is None, reason="MNIST is not on this machine: set "
                                                             "TOOLKIT_DATA_DIR to a folder holding MNIST/raw/")


def start(out: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, "-m", "toolkit.train", *RUN, "--output-dir", str(out), *extra],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def losses(out: Path) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard"))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars("train/loss")]


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "checkpoints" / f"step-{STEPS:08d}" / "model.safetensors")


@pytest.fixture(scope="module")
def baseline(request) -> Iterator[Path]:
    with scratch_dir(request, "baseline") as folder:
        out = folder / "run"
        result = run_module("toolkit.train", *RUN, "--output-dir", str(out))
        assert result.returncode == 0, result.stdout + result.stderr
        yield out


@pytest.mark.slow
def test_killed_three_times_then_resumed_is_bit_identical(baseline, tmp_path):
    out = tmp_path / "run"
    # global steps at which to kill: the first step, the last batch of epoch 1, and mid-epoch 2; each resume
    # starts from whatever checkpoint the kill left complete.
    progress_lines = []
    for kill_at in (1, 4, 6):
        extra = ("--resume", "auto") if out.exists() else ()
        code, text = run_until(out, kill_at, signal.SIGKILL, *extra)
        assert code == -signal.SIGKILL, text
        progress_lines.append(text)
    result = run_module("toolkit.train", *RUN, "--output-dir", str(out), "--resume", "auto")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "resumed" in result.stdout

    expected, got = final_weights(baseline), final_weights(out)
    assert expected.keys() == got.keys()
    assert all(torch.equal(expected[k], got[k]) for k in expected)
    assert losses(out) == losses(baseline)  # every step once, in order, with the same loss
    assert [s for s, _ in losses(out)] == list(range(1, STEPS + 1))
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    baseline_records = [json.loads(line) for line in (baseline / "metrics.jsonl").read_text().splitlines()]
    assert [(r["epoch"], r["eval_correct"], r["train_loss"]) for r in records] == \
        [(r["epoch"], r["eval_correct"], r["train_loss"]) for r in baseline_records]


def run_until(out: Path, step: int, sig: int, *extra: str) -> tuple[int, str]:
    """Start (or resume) a run and send `sig` as soon as it reports finishing global step `step`."""
    epoch, batch = (step - 1) // 4 + 1, (step - 1) % 4 + 1
    process = start(out, *extra)
    lines = []
    for line in process.stdout:
        lines.append(line)
        if line.startswith(f"epoch {epoch}/2 step {batch}/"):
            process.send_signal(sig)
            break
    lines.extend(process.stdout)
    return process.wait(timeout=300), "".join(lines)


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_finishes_the_step_saves_and_exits(tmp_path, sig, code):
    out = tmp_path / "run"
    # 16 steps per epoch, no periodic checkpoints: the only checkpoint is the one the signal causes
    returncode, text = run_until(out, 2, sig, "--checkpoint-every-steps", "0", "--train-samples", "256")
    assert returncode == code, text
    assert f"{signal.Signals(sig).name} received" in text
    (folder,) = (out / "checkpoints").iterdir()
    saved = json.loads((folder / "state.json").read_text())["progress"]
    assert saved["epoch"] == 0 and saved["batch"] == saved["step"] >= 2
    assert f"stopped at step {saved['step']}; resume with --resume auto" in text


@pytest.mark.slow
def test_non_finite_loss_stops_before_the_optimizer_step(tmp_path):
    out = tmp_path / "run"
    result = run_module("toolkit.train", *RUN, "--output-dir", str(out), "--optimizer", "sgd", "--lr", "10",
                        "--warmup-steps", "0")
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "loss is not finite at step" in lines[0] and "(rank 0)" in lines[0]
    bad_step = int(lines[0].split("at step ")[1].split()[0])
    saved = sorted((out / "checkpoints").glob("step-*"))
    assert all(int(p.name.split("-")[1]) < bad_step for p in saved)
    for folder in saved:
        assert all(torch.isfinite(t).all() for t in load_file(folder / "model.safetensors").values())


@pytest.mark.slow
def test_a_checkpoint_that_cannot_be_written_is_one_line_and_no_partial_folder(tmp_path):
    import resource

    def limit_file_size():  # no file over 100 MB, as a full disk would: each weights file is 187 MB
        resource.setrlimit(resource.RLIMIT_FSIZE, (100 * 2**20, resource.RLIM_INFINITY))

    out = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "toolkit.train", *RUN, "--output-dir", str(out)], cwd=ROOT,
                            capture_output=True, text=True, timeout=300, preexec_fn=limit_file_size)
    assert result.returncode == 1, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "could not write checkpoint step-00000001" in lines[0], result.stderr
    assert "File too large" in lines[0] and "and run again" in lines[0]
    assert list((out / "checkpoints").iterdir()) == []  # the partial folder is gone


@pytest.mark.slow
def test_a_disk_too_small_for_the_checkpoints_kept_is_said_at_the_start(tmp_path):
    # a million checkpoints kept: no disk holds them; the run says so before its first step, and goes on
    result = run_module("toolkit.train", *RUN, "--output-dir", str(tmp_path / "run"), "--keep-last", "1000000",
                        "--max-steps", "1")
    assert result.returncode == 0, result.stdout + result.stderr
    warning = next(line for line in result.stdout.splitlines() if line.startswith("warning: "))
    assert "GB free for" in warning and "(1000000 kept, the best, and the one being written, 0.75 GB each)" in warning
    assert result.stdout.index(warning) < result.stdout.index("epoch 1/2 step 1/")


@pytest.mark.slow
def test_resume_auto_skips_a_corrupted_checkpoint(baseline, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(baseline, out)
    newest = out / "checkpoints" / f"step-{STEPS:08d}"
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result = run_module("toolkit.train", *RUN, "--output-dir", str(out), "--resume", "auto")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{weights} is truncated or corrupted" in result.stdout
    assert f"resumed: {out / 'checkpoints' / f'step-{STEPS - 1:08d}'}" in result.stdout
    got = final_weights(out)
    assert all(torch.equal(v, final_weights(baseline)[k]) for k, v in got.items())


@pytest.mark.slow
def test_resume_of_a_broken_checkpoint_path_is_one_line(baseline, tmp_path):
    target = tmp_path / "ck"
    shutil.copytree(baseline / "checkpoints" / f"step-{STEPS:08d}", target)
    (target / "trainer_state.pt").write_bytes(b"garbage")
    result = run_module("toolkit.train", *RUN, "--output-dir", str(tmp_path / "new"), "--resume", str(target))
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "trainer_state.pt is truncated or corrupted" in lines[0]


@pytest.mark.slow
def test_resume_with_another_recipe_stops_with_the_difference(baseline, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(baseline, out)
    result = run_module("toolkit.train", *RUN, "--output-dir", str(out), "--resume", "auto", "--lr", "0.5")
    assert result.returncode == 2
    saved_lr = TrainConfig().lr
    assert f"the config differs (lr: checkpoint {saved_lr!r}, this run 0.5)" in result.stderr


@pytest.mark.slow
def test_resume_takes_settings_that_change_nothing_and_a_finished_run_says_so(baseline, tmp_path):
    """The baseline ran with precision auto (bf16 on this CPU, else fp32) and device auto: naming them as they
    resolved, or a different evaluation batch, changes nothing a step computes; the run had finished."""
    import json as _json

    out = tmp_path / "run"
    shutil.copytree(baseline, out)
    precision = _json.loads(next((out / "checkpoints").glob("step-*/state.json")).read_text())["precision"]
    result = run_module("toolkit.train", *RUN, "--output-dir", str(out), "--resume", "auto", "--device", "cpu",
                        "--precision", precision, "--eval-batch-size", "37")
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"nothing left to train: the run is at step {STEPS} (epoch 2 of 2)" in result.stdout, result.stdout
    assert "config differs" not in result.stdout + result.stderr
