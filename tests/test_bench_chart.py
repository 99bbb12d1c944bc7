"""The chart beside the results file: a valid PNG of a sensible size with a line per device, precision and
pipeline; and whatever happens to the chart, the JSON is written."""

import json
import struct
import sys

import pytest

from toolkit.bench import chart, cli
from toolkit.bench.plan import Case
from toolkit.bench.results import blank_row

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def png_size(path) -> tuple[int, int]:
    """(width, height) from the PNG's header, after checking its signature and that its IHDR chunk comes first."""
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, data[:8]
    length, kind, width, height = struct.unpack(">I4sII", data[8:24])
    assert (length, kind) == (13, b"IHDR")
    assert data.endswith(b"IEND\xaeB`\x82")
    return width, height


def sweep() -> list[dict]:
    """A GPU-like sweep: two devices, two precisions on one, both pipelines, train and infer, and an oom row."""
    rows = []
    for device, precision, scale in (("cuda", "bf16", 40.0), ("cuda", "no", 15.0), ("cpu", "bf16", 1.0)):
        for mode in ("train", "infer"):
            for pipeline in ("model", "trainer"):
                for batch_size in (64, 128, 256, 512):
                    row = blank_row(Case(device=device, mode=mode, pipeline=pipeline, batch_size=batch_size,
                                         precision=precision, channels_last=True, compile=False, image_size=224,
                                         warmup=1, steps=1, repeats=1))
                    if device == "cpu" and batch_size == 512:
                        row.update(status="oom", message="out of memory")
                    else:
                        rate = scale * batch_size ** 0.5 * (3 if mode == "infer" else 1) * (
                            0.97 if pipeline == "trainer" else 1)
                        step_ms = 1000 * batch_size / rate
                        row.update(status="ok", images_per_sec=rate, images_per_sec_windows=[rate],
                                   step_ms={"median": step_ms, "p10": step_ms, "p90": step_ms},
                                   peak_memory={"cuda_peak_allocated": 2 ** 30}, gflop_per_image=5.56,
                                   achieved_tflops=rate * 5.56e-3, peak_tflops=989.4, peak_source="datasheet",
                                   mfu=rate * 5.56e-3 / 989.4)
                    rows.append(row)
    return rows


def test_the_chart_is_a_png_of_sensible_size(tmp_path):
    path = tmp_path / "cuda.png"
    assert chart.write_chart(sweep(), path) == f"chart: {path}"
    width, height = png_size(path)
    assert 800 <= width <= 2000 and 300 <= height <= 1000, (width, height)  # two panels side by side
    assert path.stat().st_size > 10_000  # lines and labels, not a blank canvas


def test_one_panel_when_one_mode(tmp_path):
    rows = [r for r in sweep() if r["mode"] == "train"]
    path = tmp_path / "train.png"
    chart.write_chart(rows, path)
    width, height = png_size(path)
    assert width < 1000 and height > 300


def test_the_lines_are_one_per_device_precision_and_pipeline(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    drawn = []
    real_plot = Axes.plot

    def plot(self, *args, **kwargs):
        drawn.append((self.get_title(), kwargs["label"], list(args[0])))
        return real_plot(self, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", plot)
    chart.write_chart(sweep(), tmp_path / "lines.png")
    assert {title for title, _, _ in drawn} == {"train", "infer"}
    train = {label: x for title, label, x in drawn if title == "train"}
    assert set(train) == {"cuda bf16 model", "cuda bf16 trainer", "cuda fp32 model", "cuda fp32 trainer",
                          "cpu bf16 model", "cpu bf16 trainer"}
    assert train["cpu bf16 model"] == [64, 128, 256]  # the oom row has no point
    assert train["cuda bf16 model"] == [64, 128, 256, 512]


def test_a_setting_that_varies_is_in_the_labels(tmp_path, monkeypatch):
    from matplotlib.axes import Axes

    labels = []
    real_plot = Axes.plot
    monkeypatch.setattr(Axes, "plot", lambda self, *a, **k: labels.append(k["label"]) or real_plot(self, *a, **k))
    rows = [r for r in sweep() if r["mode"] == "train" and r["device"] == "cuda" and r["precision"] == "bf16"]
    rows += [{**r, "compile": True} for r in rows]
    chart.write_chart(rows, tmp_path / "compile.png")
    assert set(labels) == {"cuda bf16 model eager", "cuda bf16 trainer eager", "cuda bf16 model compiled",
                           "cuda bf16 trainer compiled"}


def test_nothing_measured_is_no_chart(tmp_path):
    rows = [r for r in sweep() if r["status"] == "oom"]
    assert chart.write_chart(rows, tmp_path / "none.png") == "chart: skipped, no configuration was measured"
    assert not (tmp_path / "none.png").exists()


@pytest.fixture
def measured(monkeypatch):
    """cli.main with the measuring replaced by the sweep above, as one case's rows: what it writes, not how it
    measures."""
    case = Case(device="cpu", mode="train", pipeline="both", batch_size=64, precision="bf16", channels_last=True,
                compile=False, image_size=224, warmup=1, steps=1, repeats=1)

    def run_in_processes(cases, known, progress, workers, stop):
        progress.starting(0)
        progress.finished(0, sweep())

    monkeypatch.setattr(cli, "plan", lambda args, announce: (["cuda", "cpu"], [case]))
    monkeypatch.setattr(cli, "run_in_processes", run_in_processes)
    monkeypatch.setattr(cli, "environment", lambda command, workers: {"command": command})


def test_the_command_writes_the_json_then_the_chart_beside_it(tmp_path, capsys, measured):
    path = tmp_path / "sweep.json"
    assert cli.main(["--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert len(json.loads(path.read_text())["results"]) == len(sweep())
    png_size(path.with_suffix(".png"))
    assert f"chart: {path.with_suffix('.png')}" in out


def test_no_chart_flag(tmp_path, capsys, measured):
    path = tmp_path / "sweep.json"
    assert cli.main(["--json", str(path), "--no-chart"]) == 0
    assert path.is_file() and not path.with_suffix(".png").exists()
    assert "chart:" not in capsys.readouterr().out


def test_without_matplotlib_the_chart_is_skipped_with_a_note(tmp_path, capsys, measured, monkeypatch):
    for name in list(sys.modules):
        if name == "matplotlib" or name.startswith("matplotlib."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    path = tmp_path / "sweep.json"
    assert cli.main(["--json", str(path)]) == 0
    assert "chart: skipped, matplotlib is not installed" in capsys.readouterr().out
    assert path.is_file() and not path.with_suffix(".png").exists()


def test_a_chart_that_fails_never_loses_the_json(tmp_path, capsys, measured, monkeypatch):
    def broken(rows, path):
        raise ValueError("no room on the canvas")

    monkeypatch.setattr(chart, "write_chart", broken)
    path = tmp_path / "sweep.json"
    assert cli.main(["--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "chart: failed (ValueError: no room on the canvas)" in out
    assert len(json.loads(path.read_text())["results"]) == len(sweep())


@pytest.fixture
def drawn(monkeypatch) -> dict:
    """{label: (the line's y values, its style)} of every line the chart draws."""
    from matplotlib.axes import Axes

    lines = {}
    real_plot = Axes.plot

    def plot(self, *args, **kwargs):
        lines[kwargs["label"]] = (list(args[1]), args[2])
        return real_plot(self, *args, **kwargs)

    monkeypatch.setattr(Axes, "plot", plot)
    return lines


def test_the_model_step_paired_with_the_trainer_has_its_own_line(tmp_path, drawn):
    rows = [r for r in sweep() if r["device"] == "cuda" and r["precision"] == "bf16" and r["mode"] == "train"
            and r["pipeline"] == "trainer"]
    for row in rows:
        row["paired_model_images_per_sec"] = row["images_per_sec"] * 1.05
    chart.write_chart(rows, tmp_path / "paired.png")
    assert set(drawn) == {"cuda bf16 trainer", "cuda bf16 model, paired"}
    trainer, paired = drawn["cuda bf16 trainer"], drawn["cuda bf16 model, paired"]
    assert paired[0] == pytest.approx([rate * 1.05 for rate in trainer[0]])
    assert (trainer[1], paired[1]) == ("--", ":")


def test_the_model_rows_of_pairs_are_the_dotted_line_and_not_drawn_twice(tmp_path, drawn):
    rows = [r for r in sweep() if r["device"] == "cuda" and r["precision"] == "bf16" and r["mode"] == "train"]
    for row in rows:  # --pipeline both: a model row and a trainer row from the same pairs
        row["paired"] = True
        if row["pipeline"] == "trainer":
            row["paired_model_images_per_sec"] = row["images_per_sec"] / 0.97
    chart.write_chart(rows, tmp_path / "both.png")
    assert set(drawn) == {"cuda bf16 trainer", "cuda bf16 model, paired"}
    model = [r["images_per_sec"] for r in rows if r["pipeline"] == "model"]
    assert drawn["cuda bf16 model, paired"] == (model, ":")
