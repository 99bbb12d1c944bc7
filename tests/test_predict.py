"""toolkit.predict as a user runs it: the model's own answers for image files, bad images listed, and a --json
path that never hurts a user's files."""

from __future__ import annotations

import json
from pathlib import Path

import photo_digits
import pytest
import torch
from conftest import DIGITS, accelerate_state, mnist_root, run_module, scratch_dir
from inference_cases import full_disk_after, one_error_line, save_checkpoint, snapshot, temporaries
from PIL import Image

from toolkit import checkpoint, files, inference, predict
from toolkit.data import Preprocess, load_mnist


@pytest.fixture(scope="module")
def png_folders(tmp_path_factory, digits) -> tuple[Path, Path]:
    """(folder of the digits as PNG files, folder of their black-on-white versions)."""
    plain, inverted = tmp_path_factory.mktemp("png"), tmp_path_factory.mktemp("png-inverted")
    for i, image in enumerate(digits.numpy()):
        Image.fromarray(image).save(plain / f"{i:02d}.png")
        Image.fromarray(255 - image).save(inverted / f"{i:02d}.png")
    return plain, inverted


@pytest.fixture(scope="module")
def untrained(request) -> Path:
    with scratch_dir(request, "predict") as folder:
        yield save_checkpoint(folder / "run" / "checkpoints")


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


@pytest.mark.slow
def test_predict_on_png_files_matches_the_models_batch_output(run_dir, png_folders, expected_logits, tmp_path):
    answers, result = predict_json(tmp_path, "--checkpoint", str(run_dir), "--device", "cpu", "--precision", "no",
                                   "--top-k", "3", str(png_folders[0]))
    assert result.returncode == 0, result.stderr
    assert [Path(r["file"]).name for r in answers["predictions"]] == [f"{i:02d}.png" for i in range(DIGITS)]
    assert_matches(answers["predictions"], expected_logits, top_k=3)
    assert answers["errors"] == [] and answers["precision"] == "no"
    assert "top 3" in result.stdout


@pytest.mark.slow
def test_predict_with_invert_reads_black_on_white_images_as_mnist(run_dir, png_folders, expected_logits, tmp_path):
    answers, result = predict_json(tmp_path, "--checkpoint", str(run_dir), "--device", "cpu", "--precision", "no",
                                   "--invert", str(png_folders[1]))
    assert result.returncode == 0, result.stderr
    assert_matches(answers["predictions"], expected_logits, top_k=1)


@pytest.mark.slow
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
    assert answers["precision"] == checkpoint.load_meta(inference.load(run_dir).folder)["precision"]


@pytest.mark.slow  # full-size checkpoints read and checked several times: seconds
def test_a_json_path_that_would_hurt_a_file_is_one_line_exit_2(untrained, tmp_path, capsys):
    image = tmp_path / "digit.png"
    Image.new("L", (28, 28)).save(image)
    (tmp_path / "answers").mkdir()
    before = snapshot(tmp_path, untrained)
    for path, reason in ((image, "is a file this command reads"),
                         (untrained / "config.yaml", "is a file this command reads"),
                         (untrained / "answers.json", "lies inside the checkpoint folder"),
                         (tmp_path / "answers", "is a folder"),
                         (image / "answers.json", "digit.png is a file, not a folder")):
        line = one_error_line(capsys, predict.main, ["--checkpoint", str(untrained), str(image), "--json", str(path)],
                              code=2)
        assert line.startswith(f"toolkit.predict: error: --json {path}") and reason in line, line
    assert snapshot(tmp_path, untrained) == before


def test_a_full_disk_while_writing_the_answers_leaves_no_file(untrained, tmp_path, capsys, monkeypatch):
    image = tmp_path / "digit.png"
    Image.new("L", (28, 28)).save(image)
    out = tmp_path / "new" / "answers.json"
    monkeypatch.setattr(files, "open", full_disk_after(0), raising=False)
    with accelerate_state():
        line = one_error_line(capsys, predict.main, ["--checkpoint", str(untrained), "--device", "cpu", str(image),
                                                     "--json", str(out)])
    assert line == (f"toolkit.predict: error: could not write {out} (No space left on device): nothing was written; "
                    f"free space, or give another --json")
    assert not (tmp_path / "new").exists() and temporaries(tmp_path) == []


# --- a digit from a photo: polarity told by the background, framed as MNIST's ---

PHOTOS = 300  # photo-like digits (tests/photo_digits.py) from the first MNIST test images
PHOTO_FLOOR = 0.70  # the session's small model read 91.3% of these 300, 85.8% of 2,000 (docs/inference.md)


@pytest.mark.slow
def test_photo_like_digits_are_read_right_with_the_defaults(run_dir, tmp_path):
    images, labels = load_mnist(mnist_root(), train=False, download=False)
    photos = photo_digits.write(tmp_path / "photos", images[:PHOTOS], labels[:PHOTOS])
    answers, result = predict_json(tmp_path, "--checkpoint", str(run_dir), "--device", "cpu", "--precision", "no",
                                   str(tmp_path / "photos"))
    assert result.returncode == 0, result.stderr
    assert [r["file"] for r in answers["predictions"]] == [str(path) for path, _ in photos]
    right = sum(r["digit"] == label for r, (_, label) in zip(answers["predictions"], photos, strict=True))
    assert right / PHOTOS >= PHOTO_FLOOR, f"{right}/{PHOTOS}"
    assert all(r["prepared"]["inverted"] and r["prepared"]["box"] for r in answers["predictions"])
    assert f"inverted: {PHOTOS} (auto), framed as MNIST" in result.stdout
    # what predict did before: as read, or inverted, then only fitted into 28x28: the set is no MNIST in disguise
    loaded = inference.load(run_dir)
    model = inference.ServingModel(loaded.model, Preprocess(loaded.config.image_size, loaded.config.normalize))
    for invert in (False, True):
        _, prepared, _ = inference.read_images([path for path, _ in photos], invert=invert, center=False)
        with torch.no_grad():
            digits = model(inference.batch(prepared)).argmax(dim=1)
        assert (digits == labels[:PHOTOS]).float().mean() < 0.3


@pytest.mark.slow  # a full-size checkpoint read and run: seconds
def test_the_table_and_the_json_say_what_was_done_and_what_was_not_read(untrained, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")  # the table's rows on one line each
    folder = tmp_path / "scans"
    (folder / "older").mkdir(parents=True)
    one = torch.zeros(28, 28, dtype=torch.uint8)
    one[4:24, 12:16] = 255  # a 1, as MNIST frames it
    photos = [Image.fromarray(photo_digits.photo_like(one, index=i).numpy()) for i in range(3)]
    photos[0].save(folder / "a.png")
    photos[0].save(folder / "b.gif", save_all=True, append_images=photos[1:])  # (GIF drops repeated frames)
    out = tmp_path / "answers.json"
    with accelerate_state():
        assert predict.main(["--checkpoint", str(untrained), "--device", "cpu", str(folder), "--json", str(out)]) == 0
    printed = capsys.readouterr()
    assert printed.err == ""
    assert "images read: 2, inverted: 2 (auto), framed as MNIST" in printed.out
    assert f"note: {folder / 'older'}: a folder inside {folder}: not read" in printed.out
    prepared = {line.split()[1]: line.split("│")[-2].strip() for line in printed.out.splitlines()
                if line.startswith("│")}  # the table's last column
    assert prepared == {str(folder / "a.png"): "inverted, ink 8x34 px x0.59",
                        str(folder / "b.gif"): "inverted, ink 8x34 px x0.59, only frame 1 of 3 read"}
    answers = json.loads(out.read_text())
    assert (answers["invert"], answers["center"]) == (None, True)
    assert answers["skipped"] == [{"path": str(folder / "older"), "why": f"a folder inside {folder}: not read "
                                                                         f"(give it as an IMAGE to read it)"}]
    first, second = (r["prepared"] for r in answers["predictions"])
    assert first["inverted"] and first["box"] and first["scale"] and first["note"] is None
    assert first["polarity"].startswith("auto: background ") and second["note"] == "only frame 1 of 3 read"
