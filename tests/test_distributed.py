"""Several processes through the real `accelerate launch` CLI, on the CPU with gloo."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from conftest import ROOT, mnist_root, run, run_module, scratch_dir, wait_for
from safetensors.torch import load_file

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(mnist_root() is None, reason="MNIST is not on this machine: set TOOLKIT_DATA_DIR to "
                                                              "a folder holding MNIST/raw/")]
ACCELERATE = [sys.executable, "-m", "accelerate.commands.launch"]
SMALL = ["--device", "cpu", "--image-size", "65", "--train-samples", "256", "--batch-size", "16",
         "--log-every-steps", "2", "--warmup-steps", "2", "--cpu-threads", "1", "--seed", "1"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(*args: str, processes: int = 2) -> list[str]:
    return [*ACCELERATE, "--config_file", str(ROOT / "launch" / "cpu_ddp.yaml"), "--num_processes", str(processes),
            *args]


@pytest.fixture(scope="module")
def two_process_run(request):
    with scratch_dir(request, "ddp") as folder:
        out = folder / "run"
        result = run(launch("toolkit/train.py", *SMALL, "--epochs", "1", "--eval-samples", "1001",
                            "--output-dir", str(out)), timeout=600)
        assert result.returncode == 0, result.stdout + result.stderr
        yield out, result


def test_two_processes_train_with_one_voice_and_one_event_file(two_process_run):
    out, result = two_process_run
    assert "processes: 2 (MULTI_CPU)" in result.stdout
    assert "global batch: 32 (16 x 2)" in result.stdout
    assert result.stdout.count("parameters: 46,764,746") == 1  # only rank 0 prints
    assert result.stdout.count("epoch 1/1 done") == 1
    assert "rank 1:" in result.stdout  # the per-process throughput table
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1
    record = json.loads((out / "metrics.jsonl").read_text())
    assert record["eval_count"] == 1001 and record["global_batch_size"] == 32
    saved = json.loads((out / "checkpoints" / "step-00000008" / "state.json").read_text())
    assert saved["world_size"] == 2


def test_gathered_eval_equals_one_process_on_the_saved_weights(two_process_run, tmp_path):
    out, _ = two_process_run
    logged = json.loads((out / "metrics.jsonl").read_text())
    single = run_module("toolkit.evaluate", "--checkpoint", str(out), "--eval-samples", "1001",
                        "--json", str(tmp_path / "single.json"), "--device", "cpu")
    assert single.returncode == 0, single.stdout + single.stderr
    result = json.loads((tmp_path / "single.json").read_text())
    assert result["processes"] == 1 and result["count"] == 1001
    assert result["correct"] == logged["eval_correct"]
    assert result["loss"] == pytest.approx(logged["eval_loss"], rel=1e-6)


def test_three_processes_evaluate_1001_images_exactly(two_process_run, tmp_path):
    out, _ = two_process_run
    one = run_module("toolkit.evaluate", "--checkpoint", str(out), "--eval-samples", "1001", "--device", "cpu",
                     "--json", str(tmp_path / "one.json"))
    assert one.returncode == 0, one.stderr
    single = json.loads((tmp_path / "one.json").read_text())
    result = run(launch("-m", "toolkit.evaluate", "--checkpoint", str(out), "--eval-samples", "1001",
                        "--device", "cpu", "--json", str(tmp_path / "three.json"), processes=3), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    three = json.loads((tmp_path / "three.json").read_text())
    assert three["processes"] == 3 and three["count"] == 1001
    assert three["correct"] == single["correct"]
    assert three["confusion"] == single["confusion"]
    assert result.stdout.count("accuracy:") == 1


def test_processes_see_disjoint_shards():
    result = run(launch(str(ROOT / "tests" / "ddp_shards.py"), "1001", "16", processes=3), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "epoch 0: 3 disjoint shards of 333" in result.stdout
    assert "epoch 1: 3 disjoint shards of 333" in result.stdout


def test_two_machines_on_localhost(tmp_path):
    port = str(free_port())
    out = tmp_path / "run"
    machines = [subprocess.Popen(
        [*ACCELERATE, "--config_file", str(ROOT / "launch" / "multi_node.yaml"), "--num_machines", "2",
         "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
         "--main_process_port", port, "toolkit/train.py", *SMALL, "--epochs", "1", "--max-steps", "2",
         "--eval-samples", "100", "--output-dir", str(out)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for rank in (0, 1)]
    outputs = [m.communicate(timeout=300)[0] for m in machines]
    assert [m.returncode for m in machines] == [0, 0], outputs
    assert "processes: 2 (MULTI_CPU)" in outputs[0]
    assert "parameters:" not in outputs[1]  # the second machine has no main process: it stays silent
    assert json.loads((out / "metrics.jsonl").read_text())["step"] == 2


def start_training(out: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(launch("toolkit/train.py", *SMALL, "--epochs", "3", "--eval-samples", "100",
                                   "--output-dir", str(out), *extra),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})


def test_a_killed_rank_brings_the_job_down_quickly(tmp_path):
    process = start_training(tmp_path / "run", "--dist-timeout-s", "30")
    wait_for(process, " step 2/8 ")
    workers = [p for p in psutil.Process(process.pid).children(recursive=True)
               if "toolkit/train.py" in " ".join(p.cmdline())]
    rank1 = next(p for p in workers if p.environ().get("RANK") == "1")
    killed = time.monotonic()
    rank1.send_signal(signal.SIGKILL)
    output = process.communicate(timeout=120)[0]
    assert process.returncode != 0
    assert time.monotonic() - killed < 60
    assert "Signal 9 (SIGKILL)" in output or "exitcode  : -9" in output, output[-3000:]


def test_sigterm_to_all_processes_saves_at_the_same_step_and_resume_needs_the_same_world(tmp_path):
    out = tmp_path / "run"
    process = start_training(out)
    wait_for(process, " step 4/8 ")
    os.killpg(process.pid, signal.SIGTERM)  # what a scheduler does: every process of the job gets it
    output = process.communicate(timeout=120)[0]
    assert process.returncode != 0
    assert "SIGTERM received" in output
    saved = sorted((out / "checkpoints").glob("step-*"))
    assert len(saved) == 1, output
    state = json.loads((saved[0] / "state.json").read_text())
    assert state["world_size"] == 2 and 0 < state["progress"]["batch"] < 8  # mid-epoch
    rng = torch.load(saved[0] / "trainer_state.pt", weights_only=True)["rng"]
    assert len(rng) == 2  # both ranks contributed to the same checkpoint
    assert all(torch.isfinite(t).all() for t in load_file(saved[0] / "model.safetensors").values())

    single = run_module("toolkit.train", *SMALL, "--epochs", "3", "--eval-samples", "100", "--output-dir",
                        str(out), "--resume", "auto")
    assert single.returncode == 2
    assert "stopped mid-epoch with 2" in single.stderr

    resumed = run(launch("toolkit/train.py", *SMALL, "--epochs", "3", "--eval-samples", "100", "--output-dir",
                         str(out), "--resume", "auto", "--max-steps", str(state["progress"]["step"] + 2)),
                  timeout=300)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"(step {state['progress']['step']})" in resumed.stdout


def test_accumulation_equals_a_large_batch_on_two_processes(tmp_path):
    result = run(launch(str(ROOT / "tests" / "ddp_accumulation.py"), str(mnist_root()), str(tmp_path)), timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "accumulated vs large batch on 2 processes: max difference" in result.stdout


@pytest.mark.parametrize("command, case", [
    (["toolkit/train.py", *SMALL, "--epochs", "1"], "a --resume that is not a checkpoint"),
    (["toolkit/train.py", *SMALL, "--epochs", "1"], "no MNIST"),
    (["-m", "toolkit.evaluate", "--device", "cpu"], "no MNIST"),
])
def test_a_refusal_met_by_one_process_stops_every_process_with_one_line(two_process_run, tmp_path, command, case):
    # The main process decides what to resume from, and each machine's first process reads the data before the
    # others: whatever one of them refuses, the others learn and stop with it, instead of dying in a collective
    # with a traceback (or aborting at exit with the process group still open).
    extra, env = [], {}
    if case == "no MNIST":
        env = {"TOOLKIT_DATA_DIR": str(tmp_path / "no-data")}
    if "toolkit.evaluate" in command:
        extra = ["--checkpoint", str(two_process_run[0])]
    else:
        extra = ["--output-dir", str(tmp_path / "run")]
        if case.startswith("a --resume"):
            extra += ["--resume", str(tmp_path / "nothing")]
    result = run(launch(*command, *extra), timeout=300, env=env)
    errors = [line for line in result.stderr.splitlines() if line.startswith("toolkit.") and ": error" in line]
    assert result.returncode == 1, result.stderr
    assert len(errors) == 1, result.stderr
    assert ("does not exist" if case.startswith("a --resume") else "MNIST not found") in errors[0]
    assert "[rank" not in result.stderr and "terminate called" not in result.stderr, result.stderr
    assert not (tmp_path / "run").exists()  # a run that could not start leaves no folder
