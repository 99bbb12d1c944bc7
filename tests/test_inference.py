"""toolkit.inference: a checkpoint loaded for use (finite weights only), the precision rule every command shares,
any image made into what MNIST's are, and the rule that a command never writes over what it reads.

Each command's own behaviour is in test_evaluate.py, test_predict.py and test_export.py."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from conftest import scratch_dir
from inference_cases import one_error_line, save_checkpoint, snapshot
from PIL import Image
from safetensors.torch import load_file

from toolkit import devices, evaluate, export, inference, predict
from toolkit.data import load_mnist
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


def test_read_image_decodes_any_image_into_grey(tmp_path):
    digit = torch.randint(0, 256, (28, 28), dtype=torch.uint8).numpy()
    Image.fromarray(digit).convert("RGB").save(tmp_path / "rgb.png")
    Image.fromarray(digit.astype("uint16") * 257).save(tmp_path / "16bit.png")
    rgba = Image.fromarray(255 - digit).convert("RGBA")
    rgba.putalpha(Image.fromarray(digit))  # dark strokes on a transparent page
    rgba.save(tmp_path / "transparent.png")
    Image.new("L", (20, 40), 255).save(tmp_path / "tall.png")
    for name in ("rgb.png", "16bit.png"):  # as read: neither inverted nor framed
        assert torch.equal(inference.read_image(tmp_path / name, invert=False, center=False).image,
                           torch.from_numpy(digit)), name
    flattened = inference.read_image(tmp_path / "transparent.png", invert=True, center=False).image  # white, inverted
    assert (flattened[digit == 0] == 0).all()
    tall = inference.read_image(tmp_path / "tall.png", invert=False, center=False)  # 14 x 28: black bars each side
    assert tall.image.shape == (28, 28) and (tall.image[:, :6] == 0).all() and (tall.image[:, 10:18] == 255).all()
    assert (tall.framing, tall.box, tall.scale) == ("--no-center: fitted into 28x28", None, None)


def test_transparent_strokes_are_flattened_onto_the_paper_they_contrast_with(tmp_path):
    for ink, name in ((0, "dark"), (255, "light")):
        page = Image.new("RGBA", (60, 60), (0, 0, 0, 0))  # transparent, and black beneath: invisible dark strokes
        page.paste(Image.new("RGBA", (8, 40), (ink, ink, ink, 255)), (20, 10))
        page.save(tmp_path / f"{name}.png")
        prepared = inference.read_image(tmp_path / f"{name}.png")
        assert prepared.inverted == (ink == 0), prepared  # dark strokes: flattened onto white, then inverted
        assert prepared.box == (20, 10, 28, 50) and prepared.image.max() == 255


def test_mnist_images_are_left_exactly_as_they_are_either_way_up(mnist, tmp_path):
    images, _ = load_mnist(mnist, train=False, download=False)
    for image in images[:300]:  # all 70,000 MNIST images pass (docs/inference.md); 300 keep this test quick
        assert inference.polarity(image, None)[0] is False and inference.polarity(255 - image, None)[0] is True
        assert inference.frame(image)[:2] == (image, "already framed as MNIST's: left as it is")
    for i, image in enumerate(images[:4]):  # and through the files predict reads
        Image.fromarray(image.numpy()).save(tmp_path / f"{i}.png")
        Image.fromarray(255 - image.numpy()).save(tmp_path / f"{i}-inverted.png")
        for name, inverted in ((f"{i}.png", False), (f"{i}-inverted.png", True)):
            prepared = inference.read_image(tmp_path / name)
            assert torch.equal(prepared.image, image) and prepared.inverted == inverted, name
            assert prepared.polarity.startswith("auto: background ") and prepared.box is None


def photo(width: int = 90, height: int = 60, paper: int = 180, ink: int = 40) -> torch.Tensor:
    """uint8 (height, width): grey paper, a dark bar 6 wide and 30 tall at x 50-56, y 20-50, a dark speck."""
    image = torch.full((height, width), paper, dtype=torch.uint8)
    image[20:50, 50:56] = ink
    image[3, 5] = ink  # one pixel of dust: not the digit
    return image


def test_polarity_is_told_by_the_background_unless_forced():
    assert inference.polarity(photo(), None)[0] is True  # dark on light paper
    assert inference.polarity(255 - photo(), None)[0] is False  # chalk on a blackboard
    assert inference.polarity(photo(), False) == (False, "--no-invert")
    assert inference.polarity(255 - photo(), True) == (True, "--invert")
    inverted, why = inference.polarity(torch.full((28, 28), 90, dtype=torch.uint8), None)
    assert not inverted and why.startswith("auto: one grey level (90)")


def test_a_photo_is_levelled_cropped_to_the_ink_fitted_in_20x20_and_centred_by_mass(tmp_path):
    noisy = (photo().float() + torch.randn(60, 90, generator=torch.Generator().manual_seed(0)) * 6).round()
    Image.fromarray(noisy.clamp(0, 255).to(torch.uint8).numpy()).save(tmp_path / "photo.png")
    prepared = inference.read_image(tmp_path / "photo.png")
    assert prepared.inverted and prepared.box == (50, 20, 56, 50)  # the bar, not the speck
    assert prepared.scale == pytest.approx(20 / 30, abs=1e-4)
    image = prepared.image.float()
    rows, columns = (image > 0).any(1).nonzero(), (image > 0).any(0).nonzero()
    assert int(rows[-1] - rows[0]) + 1 == 20 and int(columns[-1] - columns[0]) + 1 == 4  # 30 x 6 -> 20 x 4
    assert all(abs(centre - 14) <= 0.5 for centre in inference.centre_of_mass(image))
    assert (image > 0).sum() == 80 and (image[image > 0] > 200).float().mean() > 0.5  # paper black, ink solid
    assert prepared.to_json() == {"inverted": True, "polarity": prepared.polarity, "box": [50, 20, 56, 50],
                                  "framing": "levelled, cropped to the ink, fitted in 20x20, centred by mass",
                                  "scale": prepared.scale, "note": None}
    assert prepared.summary() == "inverted, ink 6x30 px x0.67"
    blank = tmp_path / "blank.png"
    Image.new("L", (40, 40), 200).save(blank)
    assert inference.read_image(blank).framing == "no ink found: fitted into 28x28"


def test_an_animation_is_read_at_its_first_frame_with_a_note(tmp_path):
    frames = [Image.fromarray(photo(paper=paper).numpy()) for paper in (180, 120, 220)]
    frames[0].save(tmp_path / "digits.gif", save_all=True, append_images=frames[1:])
    prepared = inference.read_image(tmp_path / "digits.gif")
    assert prepared.note == "only frame 1 of 3 read" and prepared.summary().endswith(", only frame 1 of 3 read")
    single = tmp_path / "digit.gif"
    frames[0].save(single)
    assert torch.equal(inference.read_image(single).image, prepared.image) and inference.read_image(single).note == ""


def test_image_files_names_what_it_does_not_read(tmp_path):
    folder = tmp_path / "scans"
    (folder / "old").mkdir(parents=True)
    for name in ("b.png", "a.png"):
        (folder / name).write_bytes(b"")
    os.mkfifo(folder / "pipe.png")
    (tmp_path / "dangling.png").symlink_to(tmp_path / "gone.png")
    (tmp_path / "empty" / "only-a-folder").mkdir(parents=True)
    files, errors, skipped = inference.image_files([folder, tmp_path / "missing.png", tmp_path / "dangling.png",
                                                    Path("/dev/zero"), tmp_path / "empty"])
    assert files == [folder / "a.png", folder / "b.png"]
    assert skipped == [(folder / "old", f"a folder inside {folder}: not read (give it as an IMAGE to read it)"),
                       (tmp_path / "empty" / "only-a-folder", f"a folder inside {tmp_path / 'empty'}: not read (give "
                                                              f"it as an IMAGE to read it)")]
    assert errors == [(folder / "pipe.png", "a named pipe (FIFO), not a regular file: not read"),
                      (tmp_path / "missing.png", "no such file or folder"),
                      (tmp_path / "dangling.png", "a link to a missing file"),
                      (Path("/dev/zero"), "a character device, not a regular file: not read"),
                      (tmp_path / "empty", "folder holds no files")]


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
