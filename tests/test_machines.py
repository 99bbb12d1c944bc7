"""Two machines on one host: two `accelerate launch` commands with machine ranks 0 and 1, one process each, as a user
of `launch/multi_node.yaml` starts them. They train together with exact accuracy and one writer; a run folder that
the second machine cannot see (its own mount namespace: a tmpfs over the folder), or a different --output-dir on
each machine, stops both with one line at start. And a resume under several processes reads the checkpoint once."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
from conftest import ROOT, mnist_root, run, run_module

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(mnist_root() is None, reason="MNIST is not on this machine: set TOOLKIT_DATA_DIR to "
                                                              "a folder holding MNIST/raw/")]
RUN = ["--device", "cpu", "--image-size", "65", "--train-samples", "256", "--eval-samples", "301", "--batch-size", "16",
       "--epochs", "1", "--log-every-steps", "4", "--cpu-threads", "1", "--seed", "2"]
ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def machine(rank: int, port: int, *args: str, namespace: str | None = None) -> subprocess.Popen[str]:
    """One machine's launcher; with `namespace`, in a mount namespace of its own where that folder is an empty
    tmpfs (what a machine without the shared filesystem sees)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_machines", "2",
               "--num_processes", "2", "--machine_rank", str(rank), "--main_process_ip", "127.0.0.1",
               "--main_process_port", str(port), "--rdzv_backend", "static", "--same_network",
               "toolkit/train.py", *RUN, *args]
    if namespace:
        script = 'mount -t tmpfs tmpfs "$0" && exec "$@"'
        command = ["unshare", "--mount", "--propagation", "private", "sh", "-c", script, namespace, *command]
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


def finish(*machines: subprocess.Popen[str]) -> list[tuple[int, str, str]]:
    outputs = [m.communicate(timeout=600) for m in machines]
    return [(m.returncode, out, err) for m, (out, err) in zip(machines, outputs, strict=True)]


def errors(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("toolkit.train: error")]


def test_two_machines_train_together_with_one_writer_and_exact_accuracy(tmp_path):
    out = tmp_path / "shared" / "run"
    port = free_port()
    results = finish(machine(0, port, "--output-dir", str(out)), machine(1, port, "--output-dir", str(out)))
    assert [code for code, _, _ in results] == [0, 0], results
    (_, first, _), (_, second, _) = results
    assert "processes: 2" in first and "epoch 1/1 done" in first
    assert "epoch" not in second and "processes:" not in second  # one voice: the main process's
    assert len(list((out / "tensorboard").glob("events.out.tfevents.*"))) == 1
    record = json.loads((out / "metrics.jsonl").read_text())
    assert record["eval_count"] == 301 and record["global_batch_size"] == 32
    # the same count of correct answers as one process evaluating the saved weights
    evaluated = run_module("toolkit.evaluate", "--checkpoint", str(out), "--device", "cpu", "--eval-samples", "301",
                           "--json", str(tmp_path / "eval.json"))
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads((tmp_path / "eval.json").read_text())["correct"] == record["eval_correct"]
    assert not list(out.glob(".shared-*"))  # the check's file went once every machine had seen it


@pytest.mark.skipif(shutil.which("unshare") is None or
                    subprocess.run(["unshare", "--mount", "true"], capture_output=True).returncode != 0,
                    reason="no mount namespaces here (unshare needs CAP_SYS_ADMIN): the second machine cannot be "
                           "given a filesystem of its own")
def test_a_run_folder_one_machine_cannot_see_stops_both_at_start(tmp_path):
    shared = tmp_path / "shared"
    shared.mkdir()
    out = shared / "run"
    port = free_port()
    results = finish(machine(0, port, "--output-dir", str(out)),
                     machine(1, port, "--output-dir", str(out), namespace=str(shared)))
    assert all(code != 0 for code, _, _ in results), results
    line = (f"--output-dir {out} is not on storage that all machines share (machine 1 cannot see what the main "
            f"process wrote there): put the run folder on a filesystem every machine mounts, at the same path")
    assert [line in e for e in errors(results[1][2])] == [True], results[1][2]
    assert all("Traceback" not in err.split("accelerate launch reports this exit below")[0] for _, _, err in results)
    assert list(shared.iterdir()) == []  # the new run folder went again: nothing trained


def test_a_different_output_dir_on_each_machine_is_refused(tmp_path):
    port = free_port()
    results = finish(machine(0, port, "--output-dir", str(tmp_path / "a")),
                     machine(1, port, "--output-dir", str(tmp_path / "b")))
    assert all(code != 0 for code, _, _ in results), results
    expected = (f"--output-dir differs between the processes: {tmp_path / 'a'} on machine 0, {tmp_path / 'b'} on "
                f"machine 1: give every machine the same --output-dir")
    assert [expected in e for e in errors(results[0][2])] == [True], results[0][2]
    assert list(tmp_path.iterdir()) == []


def test_a_resume_under_several_processes_reads_the_checkpoint_once(tmp_path):
    out = tmp_path / "run"
    first = run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                 str(ROOT / "launch" / "cpu_ddp.yaml"), "--num_processes", "2", "toolkit/train.py", *RUN,
                 "--max-steps", "3", "--checkpoint-every-steps", "3", "--output-dir", str(out)], timeout=600)
    assert first.returncode == 0, first.stdout + first.stderr
    resumed = run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                   str(ROOT / "launch" / "cpu_ddp.yaml"), "--num_processes", "2",
                   str(ROOT / "tests" / "ddp_resume_once.py"), *RUN, "--max-steps", "5", "--resume", "auto",
                   "--output-dir", str(out)], timeout=600)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    reads = sorted(line for line in resumed.stdout.splitlines() if line.startswith("reads on rank"))
    assert reads == ["reads on rank 0: 1 checkpoint, 1 verified", "reads on rank 1: 0 checkpoint, 0 verified"], \
        resumed.stdout
    assert "resumed:" in resumed.stdout and json.loads((out / "run.json").read_text())["step"] == 5
