"""toolkit.inference: a checkpoint loaded for use (finite weights only), the precision rule every command shares,
any image made into what MNIST's are, and the rule that a command never writes over what it reads.

Each command's own behaviour is in test_evaluate.py, test_predict.py and test_export.py."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import scratch_dir
from inference_cases import one_error_line, save_checkpoint, snapshot
from PIL import Image
from safetensors.torch import load_file

from toolkit import devices, evaluate, export, inference, predict
from toolkit.errors import UsageError
from toolkit.files import Outputs


@pytest.fixture(scope="module")
def run_folder(request) -> Path:
    """A run folder holding one untrained checkpoint: runs/x/checkpoints/step-00000000."""
    with scratch_dir(request, "inference") as folder:
        save_checkpoint(folder / "run" / "checkpoints")
        yield folder / "run"


def test_load_gives_the_saved_model_with_the_checkpoint_config_and_the_flags(run_folder):
    folder = run_folder / "checkpoints" / "step-00000000"
    loaded = inference.load(folder, {"eval_batch_size": "7", "device": "cpu"})
    assert (loaded.folder, loaded.reason) == (folder, "checkpoint given")
    assert loaded.config.image_size == 65 and loaded.config.eval_batch_size == 7 and loaded.config.device == "cpu"
    assert loaded.meta["precision"] == "no" and not loaded.model.training
    saved = load_file(folder / "model.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in loaded.model.state_dict().items())
    assert inference.load(run_folder).reason == "latest in the run"  # no best recorded: the latest


@pytest.mark.slow  # full-size checkpoints read and checked several times: seconds
def test_weights_that_are_not_finite_are_refused_by_every_command(tmp_path, capsys):
    weights = load_file(save_checkpoint(tmp_path / "good") / "model.safetensors")
    weights["features.0.weight"].view(-1)[:3] = float("nan")
    weights["classifier.7.bias"][0] = float("inf")
    folder = save_checkpoint(tmp_path / "bad", weights=weights)
    image = tmp_path / "digit.png"
    Image.new("L", (28, 28)).save(image)
    before = snapshot(tmp_path)
    for prog, main, extra in (("toolkit.evaluate", evaluate.main, ["--eval-samples", "8"]),
                              ("toolkit.predict", predict.main, [str(image)]),
                              ("toolkit.export", export.main, ["--format", "torchscript", "--output",
                                                               str(tmp_path / "out" / "model.pt")])):
        line = one_error_line(capsys, main, ["--checkpoint", str(folder), *extra])
        assert line == (f"{prog}: error: {folder / 'model.safetensors'} holds 4 values that are not finite (NaN or "
                        f"infinite), in 2 of its 16 tensors (classifier.7.bias, features.0.weight): this model cannot "
                        f"be used; use an earlier checkpoint of the run")
    assert snapshot(tmp_path) == before  # nothing written, no folder made for the export


def test_the_precision_asked_for_is_refused_as_training_refuses_it(monkeypatch):
    monkeypatch.delenv(devices.LAUNCHER_PRECISION_ENV, raising=False)
    with pytest.raises(UsageError) as training:
        devices.resolve_precision("cpu", "fp16")
    with pytest.raises(UsageError) as using:
        inference.choose_precision("cpu", "fp16", saved="no")
    assert str(using.value) == str(training.value)
    assert inference.choose_precision("cpu", "no", saved="bf16") == ("no", "")


def test_only_the_checkpoints_own_precision_falls_back_to_auto_and_says_so(monkeypatch):
    monkeypatch.delenv(devices.LAUNCHER_PRECISION_ENV, raising=False)
    auto = devices.native_precision("cpu")
    assert inference.choose_precision("cpu", None, saved="no") == ("no", "")
    assert inference.choose_precision("cpu", None, saved=None) == (auto, "")
    precision, note = inference.choose_precision("cpu", None, saved="fp16")
    assert precision == auto
    assert note == (f"the checkpoint was trained in fp16, which cpu cannot run here "
                    f"({devices.precision_problem('cpu', 'fp16')}): using auto, {auto}")


def test_read_image_prepares_any_image_as_mnist(tmp_path):
    digit = torch.randint(0, 256, (28, 28), dtype=torch.uint8).numpy()
    Image.fromarray(digit).convert("RGB").save(tmp_path / "rgb.png")
    Image.fromarray(digit.astype("uint16") * 257).save(tmp_path / "16bit.png")
    rgba = Image.fromarray(255 - digit).convert("RGBA")
    rgba.putalpha(Image.fromarray(digit))  # dark strokes on a transparent page
    rgba.save(tmp_path / "transparent.png")
    Image.new("L", (20, 40), 255).save(tmp_path / "tall.png")
    for name in ("rgb.png", "16bit.png"):
        assert torch.equal(inference.read_image(tmp_path / name), torch.from_numpy(digit)), name
    flattened = inference.read_image(tmp_path / "transparent.png", invert=True)  # onto white, then inverted
    assert (flattened[digit == 0] == 0).all()
    tall = inference.read_image(tmp_path / "tall.png")  # 14 x 28 after fitting: black bars left and right
    assert tall.shape == (28, 28) and (tall[:, :6] == 0).all() and (tall[:, 10:18] == 255).all()


def test_an_output_that_is_read_or_lies_in_a_checkpoint_folder_is_refused(run_folder, tmp_path):
    checkpoints = run_folder / "checkpoints"
    step = checkpoints / "step-00000000"
    loaded = inference.load(step)
    other_run = save_checkpoint(tmp_path / "other" / "checkpoints")
    image = tmp_path / "digit.png"
    image.write_bytes(b"an input")
    (tmp_path / "link").symlink_to(step)
    refused = {step / "model.safetensors": "is a file this command reads",
               step / "COMPLETE": "is a file this command reads",
               tmp_path / "link" / "config.yaml": "is a file this command reads",  # the same file by another name
               image: "is a file this command reads",
               step / "eval.json": f"lies inside the checkpoint folder {step.resolve()}",
               other_run / "sub" / "eval.json": f"lies inside the checkpoint folder {other_run}",
               checkpoints / "eval.json": f"lies inside {checkpoints.resolve()}, a run's checkpoints folder",
               checkpoints / "step-00000099" / "model.pt": "a run's checkpoints folder"}
    for path, reason in refused.items():
        outputs = Outputs()
        outputs.file(str(path), "--json")
        with pytest.raises(UsageError, match="^--json ") as error:
            inference.refuse_overwriting(outputs, loaded, [image])
        assert reason in str(error.value), (path, error.value)
    outputs = Outputs()
    outputs.file(str(run_folder / "eval.json"), "--json")  # beside the checkpoints, in the run folder: fine
    outputs.folder(str(tmp_path / "plots"), "--plots", ("confusion.png",))
    inference.refuse_overwriting(outputs, loaded, [image])
