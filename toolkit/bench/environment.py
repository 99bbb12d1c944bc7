"""What a run ran on, for its results file: torch.utils.collect_env's report (OS, Python, compilers, CUDA, cuDNN,
the driver, GPU models, torch-related packages) and what it does not know (Accelerate and torchvision versions,
the CPU model and usable cores, each device's worker facts, the git commit and whether the checkout differs from
it, the command and the date).

collect_env runs pip, nvidia-smi and lscpu (seconds): a script that runs many benchmarks on one machine names a
file in TOOLKIT_BENCH_ENVIRONMENT, and the report is collected by the first and read from there by the others."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from toolkit import devices
from toolkit.files import write_atomic

REPO_ROOT = Path(__file__).resolve().parents[2]
METHOD = "benchmarks/README.md, 'What is measured, and how'"
# collect_env's fields not kept under `collect_env`: lscpu's whole report (cpu_model is the line that matters),
# torch's and Python's versions (fields of ours), and the OS's name, which becomes the `os` field
LEFT_OUT = ("cpu_info", "torch_version", "os", "python_version")
SAVED_ENVIRONMENT = "TOOLKIT_BENCH_ENVIRONMENT"  # a file holding collect_env's report: read if there, else written


def collect_env() -> dict[str, Any]:
    """torch.utils.collect_env.get_env_info() as a dict (pip_packages as a list), or why it failed: it runs
    nvidia-smi, pip and lscpu, any of which a machine may lack or refuse. From $TOOLKIT_BENCH_ENVIRONMENT's file
    where an earlier run saved it there."""
    saved = os.environ.get(SAVED_ENVIRONMENT)
    if saved:
        try:
            return json.loads(Path(saved).read_text())
        except (OSError, ValueError):
            pass  # not saved yet (or unreadable): collected and saved below
    try:
        from torch.utils.collect_env import get_env_info

        info = get_env_info()._asdict()
    except Exception as error:  # noqa: BLE001 - the results matter more than this report
        return {"error": f"{type(error).__name__}: {error}"}
    report = {key: value for key, value in info.items() if key not in LEFT_OUT}
    report["pip_packages"] = (report.get("pip_packages") or "").splitlines()
    report = {"os": info.get("os"), **report}
    if saved:
        try:
            write_atomic(Path(saved), json.dumps(report))
        except OSError:
            pass  # the next run collects it again
    return report


def git_state() -> tuple[str | None, bool | None]:
    """(commit, whether tracked files differ from it) of the project's checkout, or None where unknown."""
    def git(*args: str) -> str | None:
        try:
            result = subprocess.run(["git", "-C", str(REPO_ROOT), *args], capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return result.stdout.strip() if result.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if commit is None:  # not a checkout, or no commit yet
        return None, None
    # the code's state: recorded results (benchmarks/results/) being rewritten do not make it dirty
    status = git("status", "--porcelain", "--untracked-files=no", "--", ".", ":!benchmarks/results")
    return commit, (bool(status) if status is not None else None)


def environment(command: str, workers: dict[str, Any]) -> dict[str, Any]:
    """The `environment` of a results file; `workers`: per device, its name and the torch threads the trainer
    set (what the worker processes reported)."""
    import accelerate
    import torchvision

    commit, dirty = git_state()
    report = collect_env()
    return {
        "date": datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": command,
        "torch": torch.__version__, "accelerate": accelerate.__version__, "torchvision": torchvision.__version__,
        "python": platform.python_version(), "os": report.pop("os", None) or platform.platform(),
        "cpu_model": devices.cpu_model(),
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "devices": workers,
        "git_commit": commit, "git_dirty": dirty,
        "method": METHOD,
        "collect_env": report,
    }
