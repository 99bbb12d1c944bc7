"""Using a trained model: evaluate it, predict digits from image files, export it for serving, and each bad input.

The model trained once for the whole test session (conftest.small_run) is used throughout; the bad-input cases
that fail before any model runs call the commands in-process and need neither the model nor MNIST.
"""

from __future__ import annotations

import importlib.util
import json
import warnings
from pathlib import Path

import pytest
import torch
from conftest import mnist_root, run_module
from PIL import Image

from toolkit import checkpoint, export, predict
from toolkit.config import TrainConfig
from toolkit.data import Preprocess, load_mnist
from toolkit.errors import UserError
from toolkit.evaluate import load_for_inference

IMAGES = 12  # MNIST test images written as PNG files


@pytest.fixture(scope="module")
def run_dir(small_run) -> Path:
    return small_run[0]


@pytest.fixture(scope="module")
def digits(run_dir) -> torch.Tensor:
    """The first MNIST test images, uint8 (IMAGES, 28, 28)."""
    images, _ = load_mnist(mnist_root(), train=False, download=False)
    return images[:IMAGES]


@pytest.fixture(scope="module")
def expected_logits(run_dir, digits) -> torch.Tensor:
    """The model's own fp32 batch output for `digits`, (IMAGES, 10)."""
    model, config, *_ = load_for_inference(run_dir)
    with torch.no_grad():
        return model(Preprocess(config.image_size, config.normalize)(digits))


@pytest.fixture(scope="module")
def png_folders(tmp_path_factory, digits) -> tuple[Path, Path]:
    """(folder of the digits as PNG files, folder of their black-on-white versions)."""
    plain, inverted = tmp_path_factory.mktemp("png"), tmp_path_factory.mktemp("png-inverted")
    for i, image in enumerate(digits.numpy()):
        Image.fromarray(image).save(plain / f"{i:02d}.png")
        Image.fromarray(255 - image).save(inverted / f"{i:02d}.png")
    return plain, inverted


def predict_json(tmp_path: Path, *args: str) -> tuple[dict, object]:
    out = tmp_path / "predictions.json"
    result = run_module("toolkit.predict", *args, "--json", str(out))
    return (json.loads(out.read_text()) if out.exists() else {}), result


def assert_matches(predictions: list[dict], logits: torch.Tensor, top_k: int) -> None:
    probabilities = logits.softmax(dim=1)
    top = probabilities.topk(top_k, dim=1)
    assert len(predictions) == len(logits)
    for record, values, indices in zip(predictions, top.values.tolist(), top.indices.tolist(), strict=True):
        assert record["digit"] == indices[0]
        assert record["probability"] == pytest.approx(values[0], abs=1e-5)
        assert [t["digit"] for t in record["top_k"]] == indices
        assert [t["probability"] for t in record["top_k"]] == pytest.approx(values, abs=1e-5)


# --- evaluate ---

def test_evaluate_gives_the_accuracy_the_trainer_logged(run_dir, tmp_path):
    out = tmp_path / "eval.json"
    result = run_module("toolkit.evaluate", "--checkpoint", str(run_dir), "--eval-samples", "1000",
                        "--json", str(out))
    assert result.returncode == 0, result.stderr
    evaluated = json.loads(out.read_text())
    step = int(Path(evaluated["checkpoint"]).name.removeprefix("step-"))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = next(r for r in records if r["step"] == step)
    assert (evaluated["correct"], evaluated["count"]) == (logged["eval_correct"], logged["eval_count"])
    assert evaluated["accuracy"] == logged["eval_accuracy"]
    assert evaluated["chosen_because"] == "best eval accuracy in the run"


# --- predict ---

def test_predict_on_png_files_matches_the_models_batch_output(run_dir, png_folders, expected_logits, tmp_path):
    answers, result = predict_json(tmp_path, "--checkpoint", str(run_dir), "--device", "cpu", "--precision", "no",
                                   "--top-k", "3", str(png_folders[0]))
    assert result.returncode == 0, result.stderr
    assert [Path(r["file"]).name for r in answers["predictions"]] == [f"{i:02d}.png" for i in range(IMAGES)]
    assert_matches(answers["predictions"], expected_logits, top_k=3)
    assert answers["errors"] == [] and answers["precision"] == "no"
    assert "top 3" in result.stdout


def test_predict_with_invert_reads_black_on_white_images_as_mnist(run_dir, png_folders, expected_logits, tmp_path):
    answers, result = predict_json(tmp_path, "--checkpoint", str(run_dir), "--device", "cpu", "--precision", "no",
                                   "--invert", str(png_folders[1]))
    assert result.returncode == 0, result.stderr
    assert_matches(answers["predictions"], expected_logits, top_k=1)


def test_bad_image_files_are_listed_and_the_good_ones_still_answered(run_dir, png_folders, tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    good = (png_folders[0] / "00.png").read_bytes()
    (folder / "a_good.png").write_bytes(good)
    (folder / "b_truncated.png").write_bytes(good[:len(good) // 2])
    (folder / "c_random.png").write_bytes(torch.randint(0, 256, (300,), dtype=torch.uint8).numpy().tobytes())
    (folder / "d_notes.txt").write_text("not an image")
    answers, result = predict_json(tmp_path, "--checkpoint", str(run_dir), str(folder),
                                   str(png_folders[0] / "01.png"), str(tmp_path / "missing.png"))
    assert result.returncode == 1
    assert [Path(r["file"]).name for r in answers["predictions"]] == ["a_good.png", "01.png"]
    errors = {Path(e["file"]).name: e["error"] for e in answers["errors"]}
    assert set(errors) == {"b_truncated.png", "c_random.png", "d_notes.txt", "missing.png"}
    assert "truncated" in errors["b_truncated.png"]
    assert errors["c_random.png"].startswith("not a PNG, JPEG")
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 4 and all(line.startswith("toolkit.predict: error: ") for line in lines)
    assert all(any(name in line for line in lines) for name in errors)
    # without --precision: the checkpoint's training precision, as evaluate
    assert answers["precision"] == checkpoint.load_meta(load_for_inference(run_dir)[3])["precision"]


def test_read_image_prepares_any_image_as_mnist(tmp_path):
    digit = torch.randint(0, 256, (28, 28), dtype=torch.uint8).numpy()
    Image.fromarray(digit).convert("RGB").save(tmp_path / "rgb.png")
    Image.fromarray(digit.astype("uint16") * 257).save(tmp_path / "16bit.png")
    rgba = Image.fromarray(255 - digit).convert("RGBA")
    rgba.putalpha(Image.fromarray(digit))  # dark strokes on a transparent page
    rgba.save(tmp_path / "transparent.png")
    Image.new("L", (20, 40), 255).save(tmp_path / "tall.png")
    for name in ("rgb.png", "16bit.png"):
        assert torch.equal(predict.read_image(tmp_path / name), torch.from_numpy(digit)), name
    flattened = predict.read_image(tmp_path / "transparent.png", invert=True)  # onto white, then inverted
    assert (flattened[digit == 0] == 0).all()
    tall = predict.read_image(tmp_path / "tall.png")  # 14 x 28 after fitting: black bars left and right
    assert tall.shape == (28, 28) and (tall[:, :6] == 0).all() and (tall[:, 10:18] == 255).all()


# --- export ---

def exported_round_trip(run_dir: Path, tmp_path: Path, kind: str, output: Path) -> dict:
    result = run_module("toolkit.export", "--checkpoint", str(run_dir), "--format", kind, "--output", str(output))
    assert result.returncode == 0, result.stderr
    assert "passed" in result.stdout and "max |logit difference|" in result.stdout
    assert not [p for p in output.parent.iterdir() if p.name.startswith(".")]  # no temporary file left
    sidecar = json.loads(output.with_name(output.name + ".json").read_text())
    assert sidecar["input"]["dtype"] == "uint8" and sidecar["input"]["shape"] == ["N", 28, 28]
    assert sidecar["check"]["passed"] and sidecar["check"]["count"] == export.VERIFY_IMAGES
    assert sidecar["check"]["max_abs_diff"] <= export.ATOL
    return sidecar


def assert_within_tolerance(got: torch.Tensor, expected: torch.Tensor) -> None:
    torch.testing.assert_close(got, expected, atol=export.ATOL, rtol=export.RTOL)
    assert torch.equal(got.argmax(dim=1), expected.argmax(dim=1))


def test_torchscript_export_round_trip(run_dir, digits, expected_logits, tmp_path):
    output = tmp_path / "served" / "model.pt"
    exported_round_trip(run_dir, tmp_path, "torchscript", output)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # PyTorch marks TorchScript deprecated; it still runs
        loaded = torch.jit.load(str(output))
    with torch.no_grad():
        assert_within_tolerance(loaded(digits), expected_logits)  # a batch size it was not traced with


def test_onnx_export_round_trip(run_dir, digits, expected_logits, tmp_path):
    for package in ("onnx", "onnxscript", "onnxruntime"):
        if importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed: ONNX export is the optional extra toolkit[onnx]")
    import onnxruntime

    output = tmp_path / "model.onnx"
    exported_round_trip(run_dir, tmp_path, "onnx", output)
    session = onnxruntime.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == ["images"]
    logits = torch.from_numpy(session.run(["logits"], {"images": digits.numpy()})[0])
    assert_within_tolerance(logits, expected_logits)


def test_an_export_that_fails_its_check_is_never_written(tmp_path):
    output = tmp_path / "model.pt"
    output.write_bytes(b"the previous export")
    failing = export.Check(runtime="test", images="test", count=1, max_abs_diff=1.0, worst_ratio=5000.0)
    with pytest.raises(UserError, match="beyond tolerance"):
        export.write_verified(output, lambda path: path.write_bytes(b"new"), lambda path: failing)
    assert output.read_bytes() == b"the previous export"
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_onnx_check_is_skipped_with_a_reason_without_onnxruntime(monkeypatch, tmp_path):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "onnxruntime" else real(name))
    run, why = export.runner("onnx", tmp_path / "model.onnx")
    assert run is None and why.startswith("onnxruntime is not installed")
    assert export.Check(runtime=why, images="").summary() == f"check skipped: {why}"


# --- bad checkpoints and usage: one line, non-zero exit ---

def fake_checkpoint(directory: Path, config: dict, weights: dict[str, torch.Tensor]) -> Path:
    return checkpoint.save(directory, checkpoint.Checkpoint(weights=weights, train_weights=None, trainer_state={},
                                                            progress=checkpoint.TrainProgress(), config=config,
                                                            meta={"precision": "no"}))


def one_error_line(capsys, main, argv: list[str], code: int = 1) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == code
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


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
                                                                   str(tmp_path / "out.pt")])):
            line = one_error_line(capsys, main, ["--checkpoint", str(path), *extra])
            assert line.startswith(f"{prog}: error: ") and reason in line and str(path) in line, (case, line)
    assert not (tmp_path / "out.pt").exists()


def test_usage_errors_exit_2(tmp_path, capsys):
    line = one_error_line(capsys, predict.main, ["--checkpoint", str(tmp_path), "--top-k", "0", "x.png"], code=2)
    assert "--top-k: must be between 1 and 10" in line
    line = one_error_line(capsys, export.main, ["--checkpoint", str(tmp_path), "--format", "tflite",
                                                "--output", "m"], code=2)
    assert "invalid choice: 'tflite'" in line


def test_onnx_without_its_packages_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(export, "ONNX_PACKAGES", ("onnx", "onnxscript", "no_such_package_for_this_test"))
    line = one_error_line(capsys, export.main, ["--checkpoint", str(tmp_path), "--format", "onnx",
                                                "--output", str(tmp_path / "m.onnx")])
    assert "no_such_package_for_this_test not installed" in line and "--format torchscript" in line
