"""benchmarks/gpu_check.sh rehearsed on the CPU with its steps cut at a limit: nothing of a cut step runs on after
the script returns (a benchmark worker whose parent was stopped, a training process under `accelerate launch`),
and it still writes at most 8 files."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from conftest import ROOT, mnist_root
from test_bench_run import processes_holding


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="lists processes through /proc (Linux)")
def test_steps_cut_at_their_limit_leave_no_process_behind(tmp_path):
    if mnist_root() is None:
        pytest.skip("MNIST is not on this machine: set TOOLKIT_DATA_DIR")
    marker = f"gpu-check-cut-{uuid.uuid4().hex[:12]}"
    scratch = tmp_path / marker  # TMPDIR: every step's temporary files, so every step's command line, hold it
    scratch.mkdir()
    out = scratch / "out"
    env = {**os.environ, "OUT": str(out), "DEVICE": "cpu", "QUICK": "1", "TMPDIR": str(scratch),
           "TOOLKIT_DATA_DIR": str(mnist_root()), "PYTHON": sys.executable,
           # every measuring step is cut at 10 s (a benchmark's worker is starting or measuring by then), and
           # the budget ends the run after a few of them
           "STEP_LIMIT_S": "10", "BUDGET_S": "45"}
    result = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                            env=env, timeout=400)
    log = (out / "log.txt").read_text()
    assert "=== preflight: exit 0" in log, log[-3000:]
    cut = [line for line in log.splitlines() if line.endswith("stopped at its limit of 10 s")]
    assert cut, log[-3000:]
    assert "[1/" in log, "no benchmark worker had started when its step was cut: nothing was tested"
    assert processes_holding(marker) == [], log[-3000:]
    assert result.returncode == 1  # the cut steps failed, and said so
    assert len(list(out.iterdir())) <= 8
