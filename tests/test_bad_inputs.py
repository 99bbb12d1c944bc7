"""Every input a careless or hostile user can hand over, as a table: each case runs a command as its command line
does (its `main`, in this process), and must exit with the stated code, print exactly one line and no
traceback, and leave every file that existed before (a run's checkpoints, metrics and config) byte for byte as
it was. The cases that need processes of their own (two runs at once, resuming into another run, a full disk,
signals) are in test_rundir.py, test_resume.py, test_export.py and test_distributed.py."""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import accelerate_state, mnist_root, scratch_dir
from inference_cases import one_error_line, save_checkpoint, snapshot

from toolkit import evaluate, export, predict, train
from toolkit.bench import cli as bench
from toolkit.data import MNIST_FILES


@pytest.fixture(scope="module")
def world(request) -> Iterator[dict[str, Path]]:
    """A user's files: a run folder with a complete checkpoint, bad config files, broken MNIST copies; made once
    for the module, since no case may change them (each checks it)."""
    with scratch_dir(request, "world") as tmp_path:
        yield make_world(tmp_path)


def make_world(tmp_path: Path) -> dict[str, Path]:
    run = tmp_path / "run"
    folder = save_checkpoint(run / "checkpoints")
    (run / "config.yaml").write_text("image_size: 65\n")
    (run / "metrics.jsonl").write_text('{"step": 1, "eval_accuracy": 0.5}\n')
    (tmp_path / "latin1.yaml").write_bytes("lr: 0.1  # caf\xe9\n".encode("latin-1"))
    (tmp_path / "folder.yaml").mkdir()
    (tmp_path / "a-file").write_text("not a folder")
    (tmp_path / "a.yaml").write_text("lr: 0.1\n")
    (tmp_path / "b.yaml").write_text("epochs: 2\n")
    (tmp_path / "dup.yaml").write_text("lr: 0.1\nlr: 0.2\n")
    (tmp_path / "two.yaml").write_text("lr: 0.1\n---\nepochs: 2\n")
    (tmp_path / "empty").mkdir()
    (tmp_path / "exp1").mkdir()  # a user's experiment folder, with their own commented config in it
    (tmp_path / "exp1" / "config.yaml").write_text("# my settings\nlr: 0.001\n")
    os.mkfifo(tmp_path / "fifo.png")  # reading it would wait forever for a writer
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


LONG = "n" * 300  # a file name longer than any filesystem here takes (255 bytes)
# (case, command, argv (with {tmp}, {run}, {checkpoint}, {long} filled in), exit code, text the error line holds)
CASES = [
    ("config not UTF-8", train, ["--config", "{tmp}/latin1.yaml"], 2, "is not UTF-8 text"),
    ("config a folder", train, ["--config", "{tmp}/folder.yaml"], 2, "is a folder: give a YAML file"),
    ("config a device", train, ["--config", "/dev/zero"], 2, "not a regular file"),
    ("seed beyond numpy", train, ["--seed", "4294967296"], 2, "seed: must be at most 2147483647"),
    ("time limit not a duration", train, ["--time-limit", "5x"], 2, "time_limit: '5x' is not a duration"),
    ("profile range backwards", train, ["--profile-steps", "5:2"], 2, "profile_steps: the first step must not"),
    ("tracker not installed", train, ["--log-with", "clearml"], 2, "pip install clearml"),
    # a first batch of 275 GB: the allocator refuses it at once
    ("image size out of memory", train, ["--image-size", "4096", "--batch-size", "4096", "--train-samples", "8192",
                                         "--eval-samples", "50", "--output-dir", "{tmp}/huge"], 1,
     "out of memory with --image-size 4096 and --batch-size 4096"),
    ("MNIST magic number", train, ["--data-dir", "{mnist:magic}", "--output-dir", "{tmp}/x"], 1, "magic"),
    ("MNIST 0-byte file", train, ["--data-dir", "{mnist:empty}", "--output-dir", "{tmp}/x"], 1, "empty"),
    ("MNIST label 10", train, ["--data-dir", "{mnist:label 10}", "--output-dir", "{tmp}/x"], 1, "label"),
    ("MNIST counts differ", train, ["--data-dir", "{mnist:one label short}", "--output-dir", "{tmp}/x"], 1,
     "labels but 60,000 images"),
    ("evaluate fp16 on the CPU", evaluate, ["--checkpoint", "{run}", "--device", "cpu", "--precision", "fp16"], 2,
     "precision 'fp16'"),
    ("predict fp16 on the CPU", predict, ["--checkpoint", "{run}", "--device", "cpu", "--precision", "fp16",
                                          "{tmp}/a-file"], 2, "precision 'fp16'"),
    ("predict a FIFO", predict, ["--checkpoint", "{run}", "--device", "cpu", "{tmp}/fifo.png"], 1,
     "fifo.png: a named pipe (FIFO), not a regular file: not read"),
    ("predict a device", predict, ["--checkpoint", "{run}", "--device", "cpu", "/dev/zero"], 1,
     "/dev/zero: a character device, not a regular file: not read"),
    ("export --format twice", export, ["--checkpoint", "{run}", "--format", "onnx", "--format", "torchscript",
                                       "--output", "{tmp}/m.onnx"], 2, "--format given 2 times (onnx, torchscript)"),
    ("export TorchScript as .onnx", export, ["--checkpoint", "{run}", "--format", "torchscript", "--output",
                                             "{tmp}/m.onnx"], 2, ".onnx names ONNX files"),
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
    # --- round 2: numbers without a sane bound, values that look like flags, configs given twice
    ("timeout that overflows", train, ["--dist-timeout-s", "99999999999999999999"], 2,
     "dist_timeout_s: must be at most 604800"),
    ("threads beyond any machine", train, ["--cpu-threads", "100000"], 2, "cpu_threads: must be at most 4096"),
    ("shift beyond the image", train, ["--shift-px", "100"], 2, "shift_px: must be at most 14"),
    ("shift 1e308", train, ["--shift-px", "1e308"], 2, "shift_px: must be at most 14"),
    ("lr 1e308", train, ["--lr", "1e308"], 2, "lr: must be at most 10"),
    ("negative duration after its flag", train, ["--time-limit", "-5s"], 2, "time_limit: '-5s' is not a duration"),
    ("minus infinity after its flag", train, ["--lr", "-inf"], 2, "lr: expected a finite number, got -inf"),
    ("two --config flags", train, ["--config", "{tmp}/a.yaml", "--config", "{tmp}/b.yaml"], 2,
     "--config given twice"),
    ("a key twice in a file", train, ["--config", "{tmp}/dup.yaml"], 2, "lr is set twice (lines 1 and 2)"),
    ("two YAML documents", train, ["--config", "{tmp}/two.yaml"], 2, "holds 2 YAML documents"),
    # --- names longer than the filesystem takes
    ("output dir name too long", train, ["--output-dir", "{tmp}/{long}"], 2, "a file name is too long"),
    ("resume name too long", train, ["--resume", "{tmp}/{long}", "--output-dir", "{tmp}/x"], 2,
     "a file name is too long"),
    ("data dir name too long", train, ["--data-dir", "{tmp}/{long}", "--output-dir", "{tmp}/x"], 2,
     "a file name is too long"),
    ("evaluate --json name too long", evaluate, ["--checkpoint", "{run}", "--json", "{tmp}/{long}.json"], 2,
     "a file name is too long"),
    ("evaluate --plots name too long", evaluate, ["--checkpoint", "{run}", "--plots", "{tmp}/{long}"], 2,
     "a file name is too long"),
    ("export --output name too long", export, ["--checkpoint", "{run}", "--format", "torchscript", "--output",
                                               "{tmp}/{long}.pt"], 2, "a file name is too long"),
    ("predict image name too long", predict, ["--checkpoint", "{run}", "{tmp}/{long}.png"], 2,
     "a file name is too long"),
    ("predict --checkpoint name too long", predict, ["--checkpoint", "{tmp}/{long}", "{tmp}/a-file"], 2,
     "a file name is too long"),
    # --- what a folder is, said as it is
    ("data dir a file", train, ["--data-dir", "{tmp}/a-file", "--output-dir", "{tmp}/x"], 1,
     "the data folder {tmp}/a-file is a file"),
    ("MNIST missing, no download", train, ["--data-dir", "{tmp}/empty", "--no-download", "--output-dir", "{tmp}/x"],
     1, "MNIST not found in {tmp}/empty/MNIST/raw: put"),
    ("resume a folder that is not there", train, ["--resume", "{tmp}/nothing", "--output-dir", "{tmp}/x"], 1,
     "{tmp}/nothing does not exist"),
    ("resume an empty folder", train, ["--resume", "{tmp}/empty", "--output-dir", "{tmp}/x"], 1,
     "{tmp}/empty is an empty folder, not a checkpoint"),
    ("resume a run folder", train, ["--resume", "{run}", "--output-dir", "{tmp}/x"], 1,
     "{run} is a run folder, not a checkpoint: continue it with --resume auto --output-dir {run}"),
    ("resume a checkpoints folder", train, ["--resume", "{run}/checkpoints", "--output-dir", "{tmp}/x"], 1,
     "{run}/checkpoints holds checkpoints, and is none: give one of them, e.g. {checkpoint}"),
    # --- a user's own files where a run would write: never overwritten, whatever the advice
    ("a user's config.yaml in the output dir", train, ["--config", "{tmp}/exp1/config.yaml", "--output-dir",
                                                        "{tmp}/exp1"], 2,
     "--output-dir {tmp}/exp1 holds config.yaml, which a run writes there and no run of this toolkit wrote"),
    ("--resume auto into a user's folder", train, ["--config", "{tmp}/exp1/config.yaml", "--output-dir",
                                                    "{tmp}/exp1", "--resume", "auto"], 2,
     "{tmp}/exp1 holds no run to continue, but has config.yaml"),
    ("bench --compare nested too deeply", bench, ["--compare", "{tmp}/deep.json", "{tmp}/deep.json"], 2,
     "deep.json is not a toolkit.bench results file (nested too deeply)"),
    ("bench --json nowhere writable", bench, ["--device", "cpu", "--json", "/proc/bench.json"], 2,
     "cannot write in /proc"),
]


# Cases the quick tier already covers in a fraction of a second (test_inference.py, test_export.py): here, whole,
# they cost a full-size checkpoint saved and read, seconds each.
SLOW_CASES = {"predict a FIFO", "predict a device", "export --format twice", "export TorchScript as .onnx"}


@pytest.mark.parametrize("case, command, argv, code, text", [
    pytest.param(*c, id=c[0], marks=[pytest.mark.slow] if c[0] in SLOW_CASES else []) for c in CASES])
def test_bad_input_is_one_line_and_touches_nothing(world, tmp_path, capsys, case, command, argv, code, text):
    if "{mnist:" in " ".join(argv) and mnist_root() is None:
        pytest.skip("MNIST is not on this machine (the broken copies are made from it): set TOOLKIT_DATA_DIR")
    filled = []
    for arg in argv:
        if arg.startswith("{mnist:"):
            arg = str(broken_mnist(tmp_path / "mnist", arg[len("{mnist:"):-1]))
        filled.append(arg.format(tmp=world["tmp"], run=world["run"], checkpoint=world["checkpoint"], long=LONG))
    before = snapshot(world["tmp"])
    with accelerate_state():
        line = one_error_line(capsys, command.main, filled, code=code)
    assert text.format(tmp=world["tmp"], run=world["run"], checkpoint=world["checkpoint"]) in line, line
    assert "Traceback" not in line and len(line) < 1000
    assert snapshot(world["tmp"]) == before  # every file as it was, and none added
