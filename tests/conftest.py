"""Shared test helpers: where MNIST is, and how to run the commands as a user would."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from toolkit.data import mnist_present, resolve_data_dir

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_SEED = ROOT.parent / "shared" / "reference" / "seed"


def pytest_report_header(config) -> list[str]:
    """The versions the suite ran with, first in every run's output: a release of a dependency can change what a
    test sees without a commit of ours (pyproject.toml allows ranges)."""
    from importlib.metadata import version

    names = ("torch", "torchvision", "accelerate", "safetensors", "tensorboard", "rich")
    return ["toolkit dependencies: " + ", ".join(f"{name} {version(name)}" for name in names),
            f"MNIST: {mnist_root() or 'not found (the tests that need it skip, saying so)'}"]


@pytest.hookimpl(trylast=True)  # after pytest's own tmp_path plugin has made its factory
def pytest_configure(config) -> None:
    """Every temporary file the tests and the commands they start make (torchrun's logs, the bench's scratch
    folders, `--smoke`'s run, inductor's cache) goes in this session's folder, which pytest removes when the
    session passes: a passing run leaves nothing in the temporary folder. Set before the test modules are
    imported, since some copy the environment for their commands then."""
    import tempfile

    folder = config._tmp_path_factory.getbasetemp() / "tmp"
    folder.mkdir(exist_ok=True)
    os.environ["TMPDIR"] = str(folder)
    tempfile.tempdir = None  # gettempdir() reads TMPDIR again


def mnist_root() -> Path | None:
    root = resolve_data_dir()
    if mnist_present(root):
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


def wait_for(process: subprocess.Popen[str], text: str) -> str:
    """What a running command printed until a line holding `text` (the lines after it are left to read); an
    AssertionError with all it printed, and its stderr when that is apart, if it ends without printing it."""
    lines = []
    for line in process.stdout:
        lines.append(line)
        if text in line:
            return "".join(lines)
    rest = process.stderr.read() if process.stderr else ""
    raise AssertionError(f"never printed {text!r}:\n" + "".join(lines) + rest)


def run_module(module: str, *args: str, timeout: float = 300,
               env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return run([sys.executable, "-m", module, *args], timeout=timeout, env=env)


# A run small enough for a 2-core CPU: 65 px is the smallest input the network takes.
SMALL_RUN = ["--image-size", "65", "--train-samples", "2000", "--eval-samples", "1000", "--batch-size", "32",
             "--warmup-steps", "20", "--log-every-steps", "10"]


@contextmanager
def scratch_dir(request: pytest.FixtureRequest, name: str) -> Iterator[Path]:
    """A folder for a module- or session-scoped fixture, removed when the fixture's scope ends unless a test
    failed meanwhile: the rule `tmp_path_retention_policy = "failed"` applies to `tmp_path`."""
    path = request.getfixturevalue("tmp_path_factory").mktemp(name)
    failures = request.session.testsfailed
    yield path
    if request.session.testsfailed == failures:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def small_run(request) -> Iterator[tuple[Path, subprocess.CompletedProcess[str]]]:
    """One real training run for the session, 2 epochs of SMALL_RUN: (run folder, its output). Tests only
    read it."""
    if mnist_root() is None:
        pytest.skip("MNIST is not on this machine: set TOOLKIT_DATA_DIR to a folder holding MNIST/raw/")
    with scratch_dir(request, "small-run") as folder:
        out = folder / "run"
        result = run_module("toolkit.train", *SMALL_RUN, "--epochs", "2", "--output-dir", str(out), timeout=900)
        assert result.returncode == 0, result.stdout + result.stderr
        yield out, result


@contextmanager
def accelerate_state() -> Iterator[None]:
    """A fresh Accelerate state around in-process use: it holds one precision per process, and a Trainer built
    earlier in the same test process would leave its own."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    try:
        yield
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


# The smallest trainer that still trains: 65 px, fp32 on the CPU, a few hundred images, quiet.
TINY = {"image_size": 65, "train_samples": 256, "eval_samples": 100, "batch_size": 32, "warmup_steps": 2,
        "log_every_steps": 4, "precision": "no", "device": "cpu", "download": False}


@contextmanager
def tiny_trainer(tmp_path: Path, **overrides) -> Iterator:
    """A Trainer built in this process on TINY settings (and `overrides`), writing into tmp_path/run; closed after."""
    from toolkit.config import TrainConfig
    from toolkit.train import training_run

    root = mnist_root()
    if root is None:
        pytest.skip("MNIST is not on this machine: set TOOLKIT_DATA_DIR to a folder holding MNIST/raw/")
    config = TrainConfig(**{**TINY, "data_dir": str(root), "output_dir": str(tmp_path / "run"), **overrides})
    with accelerate_state(), training_run(config, quiet=True) as trainer:
        yield trainer


# --- the model trained once for the session (small_run), and what it answers: for predict and export ---

DIGITS = 12  # MNIST test images the inference tests feed through the trained model


@pytest.fixture(scope="session")
def run_dir(small_run) -> Path:
    return small_run[0]


@pytest.fixture(scope="session")
def digits(run_dir):
    """The first MNIST test images, uint8 (DIGITS, 28, 28)."""
    from toolkit.data import load_mnist

    images, _ = load_mnist(mnist_root(), train=False, download=False)
    return images[:DIGITS]


@pytest.fixture(scope="session")
def expected_logits(run_dir, digits):
    """The trained model's own fp32 batch output for `digits`, (DIGITS, 10)."""
    import torch

    from toolkit import inference
    from toolkit.data import Preprocess

    loaded = inference.load(run_dir)
    with torch.no_grad():
        return loaded.model(Preprocess(loaded.config.image_size, loaded.config.normalize)(digits))
