"""toolkit.evaluate as a user runs it: the accuracy training logged, the pictures, the precision rule, and
output paths that never hurt a user's files.

The end-to-end case runs the command in a subprocess on the session's trained model (conftest.small_run); the
many bad-input cases call it in-process on an untrained checkpoint, most failing before any model runs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import accelerate_state, mnist_root, run_module, scratch_dir
from inference_cases import full_disk_after, one_error_line, save_checkpoint, snapshot, temporaries
from PIL import Image

from toolkit import devices, evaluate, files, inference, plots, predict
from toolkit.errors import UsageError


@pytest.fixture(scope="module")
def untrained(request) -> Path:
    """An untrained checkpoint saved as if trained in fp16: runs/x/checkpoints/step-00000000."""
    with scratch_dir(request, "evaluate") as folder:
        yield save_checkpoint(folder / "run" / "checkpoints", precision="fp16")


@pytest.mark.slow
def test_evaluate_gives_the_accuracy_the_trainer_logged_and_draws_it(small_run, tmp_path):
    run_dir = small_run[0]
    out, pictures = tmp_path / "eval.json", tmp_path / "new" / "plots"
    result = run_module("toolkit.evaluate", "--checkpoint", str(run_dir), "--eval-samples", "1000",
                        "--json", str(out), "--plots", str(pictures))
    assert result.returncode == 0, result.stderr
    evaluated = json.loads(out.read_text())
    step = int(Path(evaluated["checkpoint"]).name.removeprefix("step-"))
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = next(r for r in records if r["step"] == step)
    assert (evaluated["correct"], evaluated["count"]) == (logged["eval_correct"], logged["eval_count"])
    assert evaluated["accuracy"] == logged["eval_accuracy"]
    assert evaluated["chosen_because"] == "best eval accuracy in the run"
    assert f"plots: {pictures / 'confusion.png'}, {pictures / 'misclassified.png'}" in result.stdout
    with Image.open(pictures / "confusion.png") as confusion:  # the picture of the counts in the JSON
        assert np.array_equal(np.asarray(confusion), plots.confusion_image(torch.tensor(evaluated["confusion"])))
    with Image.open(pictures / "misclassified.png") as misclassified:
        grid = plots.misclassified_image(torch.zeros(1, 28, 28, dtype=torch.uint8), [0], [1])  # its fixed width
        assert misclassified.mode == "RGB" and misclassified.width == grid.shape[1]
    assert sorted(p.name for p in pictures.iterdir()) == ["confusion.png", "misclassified.png"]


def test_a_precision_the_device_cannot_run_is_refused_as_training_refuses_it(untrained, tmp_path, capsys,
                                                                           monkeypatch):
    monkeypatch.delenv(devices.LAUNCHER_PRECISION_ENV, raising=False)
    with pytest.raises(UsageError) as training:
        devices.resolve_precision("cpu", "fp16")
    image = tmp_path / "digit.png"
    Image.new("L", (28, 28)).save(image)
    for prog, main, extra in (("toolkit.evaluate", evaluate.main, []), ("toolkit.predict", predict.main, [str(image)])):
        line = one_error_line(capsys, main, ["--checkpoint", str(untrained), "--device", "cpu", "--precision", "fp16",
                                             *extra], code=2)
        assert line == f"{prog}: error: {training.value}"


@pytest.mark.skipif(mnist_root() is None, reason="MNIST is not on this machine")
def test_the_checkpoints_own_precision_falls_back_to_auto_and_says_so(untrained, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv(devices.LAUNCHER_PRECISION_ENV, raising=False)
    out = tmp_path / "eval.json"
    with accelerate_state():
        assert evaluate.main(["--checkpoint", str(untrained), "--device", "cpu", "--eval-samples", "16",
                              "--json", str(out)]) == 0
    auto = devices.native_precision("cpu")
    assert "note: the checkpoint was trained in fp16, which cpu cannot run here (" in capsys.readouterr().out
    assert json.loads(out.read_text())["precision"] == auto


def bad_outputs(tmp_path: Path, folder: Path) -> dict[str, tuple[str, str, str]]:
    """{case: (flag, path, text its error line must hold)} for a checkpoint `folder` in a run's checkpoints/."""
    (tmp_path / "a folder").mkdir()
    (tmp_path / "notes.txt").write_text("a file")
    images = inference.mnist_files("")[2]
    return {
        "json is a folder": ("--json", str(tmp_path / "a folder"), "is a folder: give the path of the file"),
        "json ends with /": ("--json", f"{tmp_path / 'new'}/", "is a folder: give the path of the file"),
        "json under a file": ("--json", str(tmp_path / "notes.txt" / "e.json"), "notes.txt is a file, not a folder"),
        "json unwritable": ("--json", "/proc/eval.json", "cannot write in /proc"),
        "json a device": ("--json", "/dev/null", "exists and is not a regular file"),
        "json the weights": ("--json", str(folder / "model.safetensors"), "is a file this command reads"),
        "json the MNIST images": ("--json", str(images), "is a file this command reads"),
        "json in the checkpoint": ("--json", str(folder / "eval.json"), "lies inside the checkpoint folder"),
        "plots is a file": ("--plots", str(tmp_path / "notes.txt"), "is a file: give a folder"),
        "plots under a file": ("--plots", str(tmp_path / "notes.txt" / "p"), "notes.txt is a file, not a folder"),
        "plots in checkpoints/": ("--plots", str(folder.parent / "plots"), "a run's checkpoints folder"),
        "plots cannot be made": ("--plots", "/proc/plots", "cannot create the folder /proc/plots"),
    }


@pytest.mark.slow  # full-size checkpoints read and checked several times: seconds
def test_bad_output_paths_are_one_line_exit_2_and_touch_nothing(untrained, tmp_path, capsys):
    cases = bad_outputs(tmp_path, untrained)
    watched = [tmp_path, untrained.parent.parent, inference.mnist_files("")[2]]
    before = snapshot(*watched)
    for case, (flag, path, reason) in cases.items():
        line = one_error_line(capsys, evaluate.main, ["--checkpoint", str(untrained), "--eval-samples", "16",
                                                      flag, path], code=2)
        assert line.startswith(f"toolkit.evaluate: error: {flag}") and reason in line, (case, line)
    assert snapshot(*watched) == before


@pytest.mark.skipif(mnist_root() is None, reason="MNIST is not on this machine")
def test_a_full_disk_while_writing_leaves_every_file_as_it_was(untrained, tmp_path, capsys, monkeypatch):
    old = tmp_path / "eval.json"
    old.write_text("the previous results")
    before = snapshot(tmp_path)
    monkeypatch.setattr(files, "open", full_disk_after(20_000), raising=False)  # the JSON fits, a PNG does not
    with accelerate_state():
        line = one_error_line(capsys, evaluate.main, ["--checkpoint", str(untrained), "--device", "cpu",
                                                      "--eval-samples", "16", "--json", str(old),
                                                      "--plots", str(tmp_path / "new" / "plots")])
    assert line == (f"toolkit.evaluate: error: could not write {old}, {tmp_path / 'new' / 'plots' / 'confusion.png'}, "
                    f"{tmp_path / 'new' / 'plots' / 'misclassified.png'} (No space left on device): nothing was "
                    f"written; free space, or give another --json / --plots")
    assert snapshot(tmp_path) == before and temporaries(tmp_path) == []  # the folders made for the plots: gone
