"""toolkit.export as a user runs it: round trips through TorchScript and ONNX, a check no NaN can pass, and an
output that never hurts a user's files, a full disk included."""

from __future__ import annotations

import importlib.util
import json
import resource
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import ROOT, run_module, scratch_dir
from inference_cases import one_error_line, save_checkpoint, snapshot, temporaries
from PIL import Image
from safetensors.torch import load_file

from toolkit import checkpoint, export, files, inference, predict
from toolkit.config import TrainConfig
from toolkit.data import Preprocess
from toolkit.errors import UserError
from toolkit.model import build_model


@pytest.fixture(scope="module")
def untrained(request) -> Path:
    """An untrained checkpoint in a run's checkpoints/ folder."""
    with scratch_dir(request, "export") as folder:
        yield save_checkpoint(folder / "run" / "checkpoints")


def exported_round_trip(run_dir: Path, kind: str, output: Path) -> dict:
    result = run_module("toolkit.export", "--checkpoint", str(run_dir), "--format", kind, "--output", str(output))
    assert result.returncode == 0, result.stderr
    assert "passed" in result.stdout and "max |logit difference|" in result.stdout
    assert temporaries(output.parent) == []
    sidecar = json.loads(output.with_name(output.name + ".json").read_text())
    assert sidecar["input"]["dtype"] == "uint8" and sidecar["input"]["shape"] == ["N", 28, 28]
    assert sidecar["check"]["passed"] and sidecar["check"]["count"] == export.VERIFY_IMAGES
    assert sidecar["check"]["max_abs_diff"] <= export.ATOL and sidecar["check"]["non_finite"] == 0
    return sidecar


def assert_within_tolerance(got: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(got, expected, atol=export.ATOL, rtol=export.RTOL)
    assert torch.equal(got.argmax(dim=1), expected.argmax(dim=1))


@pytest.mark.slow
def test_torchscript_export_round_trip(run_dir, digits, expected_logits, tmp_path):
    output = tmp_path / "served" / "model.pt"
    exported_round_trip(run_dir, "torchscript", output)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # PyTorch marks TorchScript deprecated; it still runs
        loaded = torch.jit.load(str(output))
    with torch.no_grad():
        assert_within_tolerance(loaded(digits), expected_logits)  # a batch size it was not traced with


@pytest.mark.slow
def test_onnx_export_round_trip(run_dir, digits, expected_logits, tmp_path):
    for package in ("onnx", "onnxscript", "onnxruntime"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed: ONNX export is the optional extra toolkit[onnx]")
    import onnxruntime

    output = tmp_path / "model.onnx"
    exported_round_trip(run_dir, "onnx", output)
    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    logits = torch.from_numpy(session.run(["logits"], {"images": digits.numpy()})[0])
    assert_within_tolerance(logits, expected_logits)


# --- the check: any logit that is not finite fails it ---

def serving_model(weights: dict[str, torch.Tensor]) -> inference.ServingModel:
    model = build_model(init="default", dropout=0.5)
    model.load_state_dict(weights)
    return inference.ServingModel(model, Preprocess(65)).eval()


def test_a_nan_from_the_exported_model_fails_the_check(untrained, monkeypatch):
    serving = serving_model(load_file(untrained / "model.safetensors"))
    images = torch.randint(0, 256, (4, 28, 28), dtype=torch.uint8)
    monkeypatch.setattr(export, "runner", lambda kind, data: (lambda batch: torch.full((len(batch), 10), torch.nan),
                                                              "NaN everywhere"))
    result = export.check(serving, "torchscript", b"", images, "4 random images")
    assert result.non_finite == 50 and result.worst_ratio == float("inf") and not result.passed  # 4x10 + 1x10
    assert "50 logits not finite" in result.summary() and result.summary().endswith("FAILED")


@pytest.mark.slow  # full-size checkpoints read and checked several times: seconds
def test_a_model_with_nan_weights_fails_the_check_and_nothing_is_written(untrained, tmp_path, capsys, monkeypatch):
    weights = load_file(untrained / "model.safetensors")
    weights["classifier.7.bias"][3] = float("nan")
    folder = save_checkpoint(tmp_path / "nan", weights=weights)
    monkeypatch.setattr(inference, "check_finite", lambda weights, source: None)  # past the load-time refusal
    before = snapshot(tmp_path)
    output = tmp_path / "served" / "model.pt"
    line = one_error_line(capsys, export.main, ["--checkpoint", str(folder), "--format", "torchscript",
                                                "--output", str(output)])
    assert line.startswith(f"toolkit.export: error: the exported model differs from PyTorch beyond tolerance, {output} "
                           f"not written: check (torch.jit.load, ")
    assert "logits not finite" in line and line.endswith("FAILED")
    assert snapshot(tmp_path) == before  # not even the folder


# --- outputs that never hurt a user's files ---

@pytest.mark.slow  # full-size checkpoints read and checked several times: seconds
def test_an_output_that_would_hurt_a_file_is_one_line_exit_2(untrained, tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("a file")
    (tmp_path / "served").mkdir()
    checkpoints = untrained.parent
    before = snapshot(tmp_path, checkpoints.parent)
    for path, reason in ((untrained / "model.safetensors", "is a file this command reads"),
                         (untrained / "served.pt", "lies inside the checkpoint folder"),
                         (checkpoints / "served" / "model.pt", "a run's checkpoints folder"),
                         (tmp_path / "served", "is a folder"),
                         (tmp_path / "notes.txt" / "model.pt", "notes.txt is a file, not a folder"),
                         (Path("/proc/served/model.pt"), "cannot create the folder /proc/served")):
        line = one_error_line(capsys, export.main, ["--checkpoint", str(untrained), "--format", "torchscript",
                                                    "--output", str(path)], code=2)
        assert line.startswith(f"toolkit.export: error: --output {path}") and reason in line, line
    assert snapshot(tmp_path, checkpoints.parent) == before


def test_too_little_free_space_is_said_before_the_export(untrained, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(files.shutil, "disk_usage", lambda path: SimpleNamespace(total=10**9, used=0, free=50_000_000))
    output = tmp_path / "served" / "model.pt"
    line = one_error_line(capsys, export.main, ["--checkpoint", str(untrained), "--format", "torchscript",
                                                "--output", str(output)])
    assert line == (f"toolkit.export: error: {output.parent} has 50 MB free and the torchscript export takes about "
                    f"187 MB: free space, or give another --output")
    assert list(tmp_path.iterdir()) == []  # the folder made for it removed again


@pytest.mark.slow
def test_a_full_disk_is_one_line_and_leaves_the_previous_export(untrained, tmp_path):
    def limit_file_size():  # no file over 100 MB, as a full disk would: the export is 187 MB
        resource.setrlimit(resource.RLIMIT_FSIZE, (100 * 2**20, resource.RLIM_INFINITY))

    output = tmp_path / "model.pt"
    output.write_bytes(b"the previous export")
    output.with_name("model.pt.json").write_text("{}")
    before = snapshot(tmp_path, untrained)
    result = subprocess.run([sys.executable, "-m", "toolkit.export", "--checkpoint", str(untrained), "--format",
                             "torchscript", "--output", str(output)], cwd=ROOT, capture_output=True, text=True,
                            timeout=300, preexec_fn=limit_file_size)
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stderr.strip() == (f"toolkit.export: error: could not write {output}, {output}.json (File too "
                                     f"large): nothing was written; free space, or give another --output")
    assert snapshot(tmp_path, untrained) == before and temporaries(tmp_path) == []


# --- bad checkpoints and usage: one line, non-zero exit ---

def fake_checkpoint(directory: Path, config: dict, weights: dict[str, torch.Tensor]) -> Path:
    return checkpoint.save(directory, checkpoint.Checkpoint(weights=weights, train_weights=None, trainer_state={},
                                                            progress=checkpoint.TrainProgress(), config=config,
                                                            meta={"precision": "no"}))


def bad_checkpoints(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """{case: (checkpoint path, text its error line must hold)}"""
    (tmp_path / "random.bin").write_bytes(b"\x00\x01 not a checkpoint")
    (tmp_path / "empty").mkdir()
    torch.save({"weights": torch.zeros(3)}, tmp_path / "model.pth")
    unknown_key = fake_checkpoint(tmp_path / "newer", {**TrainConfig().to_dict(), "colour_mode": "rgb"},
                                  {"x": torch.zeros(1)})
    rgb = fake_checkpoint(tmp_path / "rgb", TrainConfig().to_dict(), {"features.0.weight": torch.zeros(96, 3, 11, 11)})
    return {"random file": (tmp_path / "random.bin", "is a file: a checkpoint is a folder"),
            "empty folder": (tmp_path / "empty", "neither a checkpoint folder"),
            "pickle": (tmp_path / "model.pth", "is a file: a checkpoint is a folder"),
            "unknown config key": (unknown_key, "unknown key 'colour_mode'"),
            "other weight shapes": (rgb, "shape features.0.weight (96, 3, 11, 11) vs (96, 1, 11, 11)")}


def test_bad_checkpoints_are_one_line_and_exit_1(tmp_path, capsys):
    image = tmp_path / "digit.png"
    Image.new("L", (28, 28)).save(image)
    for case, (path, reason) in bad_checkpoints(tmp_path).items():
        for prog, main, extra in (("toolkit.predict", predict.main, [str(image)]),
                                  ("toolkit.export", export.main, ["--format", "torchscript", "--output",
                                                                   str(tmp_path / "out" / "out.pt")])):
            line = one_error_line(capsys, main, ["--checkpoint", str(path), *extra])
            assert line.startswith(f"{prog}: error: ") and reason in line and str(path) in line, (case, line)
    assert not (tmp_path / "out").exists()


def test_usage_errors_exit_2(tmp_path, capsys):
    line = one_error_line(capsys, predict.main, ["--checkpoint", str(tmp_path), "--top-k", "0", "x.png"], code=2)
    assert "--top-k: must be between 1 and 10" in line
    line = one_error_line(capsys, export.main, ["--checkpoint", str(tmp_path), "--format", "tflite",
                                                "--output", "m"], code=2)
    assert "invalid choice: 'tflite'" in line


def test_a_repeated_format_or_an_extension_of_the_other_format_is_refused_before_any_work(tmp_path, capsys):
    missing = str(tmp_path / "no-checkpoint")  # never read: the refusal comes first
    for argv, expected in (
            (["--format", "onnx", "--format", "torchscript", "--output", "m.onnx"],
             "--format given 2 times (onnx, torchscript): one export per command; run it once per format"),
            (["--format", "torchscript", "--format", "torchscript", "--output", "m.pt"],
             "--format given 2 times (torchscript, torchscript): one export per command; run it once per format"),
            (["--format", "torchscript", "--output", "served/m.onnx"],
             "--output served/m.onnx: .onnx names ONNX files, and --format torchscript writes TorchScript: name it "
             "m.pt, or give --format onnx"),
            (["--format", "onnx", "--output", "m.PTH"],
             "--output m.PTH: .pth names TorchScript files, and --format onnx writes ONNX: name it m.onnx, or give "
             "--format torchscript")):
        line = one_error_line(capsys, export.main, ["--checkpoint", missing, *argv], code=2)
        assert line == f"toolkit.export: error: {expected}"
    for kind, output in (("onnx", "m.onnx"), ("torchscript", "m.pt"), ("torchscript", "m.bin"), ("onnx", "model")):
        export.check_extension(kind, output)  # its own extension, or one that says nothing: accepted


def test_onnx_without_its_packages_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(export, "ONNX_PACKAGES", ("onnx", "onnxscript", "no_such_package_for_this_test"))
    line = one_error_line(capsys, export.main, ["--checkpoint", str(tmp_path), "--format", "onnx",
                                                "--output", str(tmp_path / "m.onnx")])
    assert "no_such_package_for_this_test not installed" in line and "--format torchscript" in line


def test_onnx_check_is_skipped_with_a_reason_without_onnxruntime(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name))
    run, why = export.runner("onnx", b"")
    assert run is None and why.startswith("onnxruntime is not installed")
    assert export.Check(runtime=why, images="").summary() == f"check skipped: {why}"


def test_an_export_that_fails_its_check_raises_before_anything_is_written(untrained, monkeypatch):
    serving = serving_model(load_file(untrained / "model.safetensors"))
    images = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)
    monkeypatch.setattr(export, "check", lambda *a: export.Check(runtime="test", images="test", count=1,
                                                                 max_abs_diff=1.0, worst_ratio=5000.0))
    with pytest.raises(UserError, match="beyond tolerance, out.pt not written"):
        export.verified("torchscript", serving, images, "test", Path("out.pt"))
