"""torchrun's elastic restarts, as docs/distributed.md gives them: a worker killed after a checkpoint, the group
restarted by the agent, and the run resumed from that checkpoint to the weights of a run never interrupted."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest
import torch
from conftest import ROOT, mnist_root
from safetensors.torch import load_file

from toolkit import checkpoint

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(mnist_root() is None, reason="MNIST is not on this machine: set TOOLKIT_DATA_DIR to "
                                                              "a folder holding MNIST/raw/")]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc-per-node", "2",
            "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0", "--max-restarts", "2", "-m", "toolkit.train"]
# 8 steps of 2 x 32 images, a checkpoint every 2
TINY = ["--device", "cpu", "--image-size", "65", "--train-samples", "256", "--eval-samples", "100",
        "--batch-size", "32", "--epochs", "2", "--warmup-steps", "2", "--log-every-steps", "1", "--cpu-threads", "1",
        "--ema-decay", "0", "--checkpoint-every-steps", "2", "--keep-last", "1", "--resume", "auto"]
# Without it the restarted workers meet the first group's keys in the agent's store, and a restart fails about
# half the time (gloo "connectFullMesh failed ... Connection refused"): see docs/distributed.md.
ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "TORCH_DISABLE_SHARE_RDZV_TCP_STORE": "1"}


def torchrun(out) -> subprocess.Popen[str]:
    return subprocess.Popen([*TORCHRUN, *TINY, "--output-dir", str(out)], cwd=ROOT, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)


def rank_1(agent: subprocess.Popen[str]) -> psutil.Process:
    for child in psutil.Process(agent.pid).children(recursive=True):
        if child.environ().get("RANK") == "1" and "toolkit.train" in child.cmdline():
            return child
    raise AssertionError("no worker with RANK=1")


def test_a_killed_worker_is_restarted_and_the_run_resumes_to_the_same_weights(tmp_path):
    killed = torchrun(tmp_path / "killed")
    deadline = time.monotonic() + 240
    while not list((tmp_path / "killed" / "checkpoints").glob("step-*/COMPLETE")):
        assert killed.poll() is None and time.monotonic() < deadline, killed.communicate()[0]
        time.sleep(0.1)
    rank_1(killed).send_signal(signal.SIGKILL)
    output = killed.communicate(timeout=300)[0]
    assert killed.returncode == 0, output
    assert "exitcode: -9" in output  # the agent saw the kill ...
    assert f"resumed: {tmp_path / 'killed' / 'checkpoints'}" in output  # ... and its new workers resumed
    assert json.loads((tmp_path / "killed" / "run.json").read_text())["status"] == "finished"

    whole = torchrun(tmp_path / "whole")
    output = whole.communicate(timeout=300)[0]
    assert whole.returncode == 0 and "resumed:" not in output, output
    for out in (tmp_path / "killed", tmp_path / "whole"):
        assert checkpoint.load(checkpoint.step_dir(out / "checkpoints", 8)).meta["world_size"] == 2
    weights = [load_file(checkpoint.step_dir(out / "checkpoints", 8) / checkpoint.WEIGHTS)
               for out in (tmp_path / "killed", tmp_path / "whole")]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])
