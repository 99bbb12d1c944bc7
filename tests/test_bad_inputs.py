"""Every input a careless or hostile user can hand over, as a table: each case runs a command as its command line
does (its `main`, in this process), and must exit with the stated code, print exactly one line and no
traceback, and leave every file that existed before (a run's checkpoints, metrics and config) byte for byte as
it was. The cases that need processes of their own (two runs at once, resuming into another run, a full disk,
signals) are in test_rundir.py, test_resume.py, test_export.py and test_distributed.py."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from conftest import accelerate_state, mnist_root
from inference_cases import one_error_line, save_checkpoint, snapshot

from toolkit import evaluate, export, predict, train
from toolkit.bench import cli as bench
from toolkit.data import MNIST_FILES


@pytest.fixture
def world(tmp_path: Path) -> dict[str, Path]:
    """A user's files: a run folder with a complete checkpoint, bad config files, broken MNIST copies."""
    run = tmp_path / "run"
    folder = save_checkpoint(run / "checkpoints")
    (run / "config.yaml").write_text("image_size: 65\n")
    (run / "metrics.jsonl").write_text('{"step": 1, "eval_accuracy": 0.5}\n')
    (tmp_path / "latin1.yaml").write_bytes("lr: 0.1  # caf\xe9\n".encode("latin-1"))
    (tmp_path / "folder.yaml").mkdir()
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "deep.json").write_text("[" * 100_000 + "]" * 100_000)
    (tmp_path / "results.json").write_text(json.dumps({"results": [
        {"device": "cpu", "mode": "train", "pipeline": "model", "image_size": 65, "batch_size": 2,
         "precision": "no", "channels_last": True, "compile": False, "status": "ok", "images_per_sec": None,
         "step_ms": None}]}))
    return {"tmp": tmp_path, "run": run, "checkpoint": folder}


def broken_mnist(root: Path, change: str) -> Path:
    """A copy of MNIST's four files under root/MNIST/raw/ with one thing wrong."""
    source = mnist_root() / "MNIST" / "raw"
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in MNIST_FILES:
        data = (source / name).read_bytes()
        if name == "train-labels-idx1-ubyte":
            if change == "magic":
                data = struct.pack(">I", 0x0802) + data[4:]
            elif change == "empty":
                data = b""
            elif change == "label 10":
                data = data[:8] + bytes([10]) + data[9:]
            elif change == "one label short":
                data = struct.pack(">II", 0x0801, 59_999) + data[8:-1]
        (raw / name).write_bytes(data)
    return root


# (case, command, argv (with {tmp}, {run}, {checkpoint} filled in), exit code, text the error line holds)
CASES = [
    ("config not UTF-8", train, ["--config", "{tmp}/latin1.yaml"], 2, "is not UTF-8 text"),
    ("config a folder", train, ["--config", "{tmp}/folder.yaml"], 2, "is a folder: give a YAML file"),
    ("config a device", train, ["--config", "/dev/zero"], 2, "not a regular file"),
    ("seed beyond numpy", train, ["--seed", "4294967296"], 2, "seed: must be at most 2147483647"),
    ("time limit not a duration", train, ["--time-limit", "5x"], 2, "time_limit: '5x' is not a duration"),
    ("profile range backwards", train, ["--profile-steps", "5:2"], 2, "profile_steps: the first step must not"),
    ("tracker not installed", train, ["--log-with", "clearml"], 2, "pip install clearml"),
    ("image size out of memory", train, ["--image-size", "60000", "--train-samples", "64", "--eval-samples", "50",
                                         "--output-dir", "{tmp}/huge"], 1,
     "out of memory with --image-size 60000 and --batch-size 128"),
    ("MNIST magic number", train, ["--data-dir", "{mnist:magic}", "--output-dir", "{tmp}/x"], 1, "magic"),
    ("MNIST 0-byte file", train, ["--data-dir", "{mnist:empty}", "--output-dir", "{tmp}/x"], 1, "empty"),
    ("MNIST label 10", train, ["--data-dir", "{mnist:label 10}", "--output-dir", "{tmp}/x"], 1, "label"),
    ("MNIST counts differ", train, ["--data-dir", "{mnist:one label short}", "--output-dir", "{tmp}/x"], 1,
     "labels but 60,000 images"),
    ("evaluate fp16 on the CPU", evaluate, ["--checkpoint", "{run}", "--device", "cpu", "--precision", "fp16"], 2,
     "precision 'fp16'"),
    ("predict fp16 on the CPU", predict, ["--checkpoint", "{run}", "--device", "cpu", "--precision", "fp16",
                                          "{tmp}/a-file"], 2, "precision 'fp16'"),
    ("export over its own weights", export, ["--checkpoint", "{run}", "--format", "torchscript", "--output",
                                             "{checkpoint}/model.safetensors"], 2, "it would be overwritten"),
    ("evaluate --json a folder", evaluate, ["--checkpoint", "{run}", "--json", "{tmp}/folder.yaml"], 2,
     "is a folder"),
    ("evaluate --json under a file", evaluate, ["--checkpoint", "{run}", "--json", "{tmp}/a-file/eval.json"], 2,
     "is a file, not a folder"),
    ("evaluate --json nowhere writable", evaluate, ["--checkpoint", "{run}", "--json", "/proc/eval.json"], 2,
     "cannot write in /proc"),
    ("bench --compare null fields", bench, ["--compare", "{tmp}/results.json", "{tmp}/results.json"], 2,
     "results.json"),
    ("bench --compare nested too deeply", bench, ["--compare", "{tmp}/deep.json", "{tmp}/deep.json"], 2,
     "deep.json is not a toolkit.bench results file (nested too deeply)"),
    ("bench --json nowhere writable", bench, ["--device", "cpu", "--json", "/proc/bench.json"], 2,
     "cannot write in /proc"),
]


@pytest.mark.parametrize("case, command, argv, code, text", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_touches_nothing(world, capsys, case, command, argv, code, text):
    if "{mnist:" in " ".join(argv) and mnist_root() is None:
        pytest.skip("MNIST is not on this machine (the broken copies are made from it): set TOOLKIT_DATA_DIR")
    filled = []
    for arg in argv:
        if arg.startswith("{mnist:"):
            arg = str(broken_mnist(world["tmp"] / "mnist", arg[len("{mnist:"):-1]))
        filled.append(arg.format(tmp=world["tmp"], run=world["run"], checkpoint=world["checkpoint"]))
    before = snapshot(world["run"])
    with accelerate_state():
        line = one_error_line(capsys, command.main, filled, code=code)
    assert text in line, line
    assert "Traceback" not in line
    assert snapshot(world["run"]) == before
    # a training that failed before its first step leaves no run folder behind
    assert not (world["tmp"] / "x").exists() and not (world["tmp"] / "huge").exists()
