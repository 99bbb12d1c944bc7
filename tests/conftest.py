"""Shared test helpers: where MNIST is, and how to run the commands as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from toolkit.data import MNIST_FILES, resolve_data_dir

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_SEED = ROOT.parent / "shared" / "reference" / "seed"


def mnist_root() -> Path | None:
    root = resolve_data_dir()
    if all((root / "MNIST" / "raw" / name).is_file() for name in MNIST_FILES):
        return root.resolve()
    return None


@pytest.fixture
def mnist() -> Path:
    root = mnist_root()
    if root is None:
        pytest.skip("MNIST is not on this machine: set TOOLKIT_DATA_DIR to a folder holding MNIST/raw/")
    return root


def run(args: list[str], timeout: float = 300, env: dict[str, str] | None = None,
        cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    """Run a command with the test's Python, capturing its output."""
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=cwd)


def run_module(module: str, *args: str, timeout: float = 300,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", module, *args], timeout=timeout, env=env)


# A run small enough for a 2-core CPU: 65 px is the smallest input the network takes.
SMALL_RUN = ["--image-size", "65", "--train-samples", "2000", "--eval-samples", "1000", "--batch-size", "32",
             "--warmup-steps", "20", "--log-every-steps", "10"]
