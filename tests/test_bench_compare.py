"""`toolkit.bench --compare A.json B.json`: the ratio table, and files that are broken or hold rows without
numbers: one line naming the file and the field (exit 2), or a `-` cell for a row that has no number by right."""

import json

import pytest

from toolkit.bench import cli
from toolkit.bench.plan import Case
from toolkit.bench.results import blank_row


def row(pipeline="model", batch_size=2, rate=100.0, **changes):
    found = blank_row(Case(device="cpu", mode="train", pipeline=pipeline, batch_size=batch_size, precision="no",
                           channels_last=True, compile=False, image_size=65, warmup=0, steps=1, repeats=1))
    found.update(status="ok", images_per_sec=rate, step_ms={"median": 1000 * batch_size / rate, "p10": 0, "p90": 0})
    found.update(changes)
    return found


def write(path, rows, environment=None):
    path.write_text(json.dumps({"environment": environment or {}, "results": rows}))
    return str(path)


def compare(capsys, a, b):
    code = cli.main(["--compare", a, b])
    return code, capsys.readouterr().out


def refused(capsys, a, b):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--compare", a, b])
    err = capsys.readouterr().err
    assert exit_.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


def test_compare_prints_the_ratio_of_matching_rows(tmp_path, capsys):
    a = write(tmp_path / "a.json", [row(batch_size=2, rate=100.0), row(batch_size=4, rate=50.0)])
    b = write(tmp_path / "b.json", [row(batch_size=2, rate=250.0), row("trainer", 2, rate=80.0)])
    code, out = compare(capsys, a, b)
    assert code == 0
    assert "2.500" in out
    # settings that vary within a file identify rows; mode, size, precision... are the same everywhere
    assert "only in A: pipeline=model, batch_size=4\n" in out
    assert "only in B: pipeline=trainer, batch_size=2\n" in out


def test_compare_leaves_out_the_setting_being_compared(tmp_path, capsys):
    a = write(tmp_path / "eager.json", [row(batch_size=2, rate=100.0), row(batch_size=4, rate=120.0)])
    b = write(tmp_path / "compiled.json", [row(batch_size=2, rate=150.0, compile=True),
                                           row(batch_size=4, rate=240.0, compile=True)])
    code, out = compare(capsys, a, b)
    assert code == 0
    assert "A: compile=False; B: compile=True" in out
    assert "1.500" in out and "2.000" in out


def test_a_row_without_numbers_by_right_gets_dashes(tmp_path, capsys):
    """An oom or error row has no rate and no step time: its cells say its status or `-`, the ratio `-`."""
    oom = row(batch_size=4, status="oom", images_per_sec=None, step_ms=None, message="CUDA out of memory")
    a = write(tmp_path / "a.json", [row(batch_size=2, rate=100.0), row(batch_size=4, rate=50.0)])
    b = write(tmp_path / "b.json", [row(batch_size=2, rate=200.0), oom])
    code, out = compare(capsys, a, b)
    assert code == 0
    rows = [[cell.strip() for cell in line.strip("│").split("│")] for line in out.splitlines() if "│" in line]
    assert ["4", "50.0", "oom", "-", "80.0", "-"] in rows
    assert "2.000" in out


BROKEN = {  # what the file holds instead of a good row -> what the one line must name
    "status missing": ({"status": "delete"}, "status is missing"),
    "status null": ({"status": None}, "status is null"),
    "status unknown": ({"status": "fast"}, 'status is "fast", expected one of ok, oom, error'),
    "images_per_sec 0": ({"images_per_sec": 0}, "images_per_sec is 0"),
    "images_per_sec null": ({"images_per_sec": None}, "images_per_sec is null"),
    "images_per_sec missing": ({"images_per_sec": "delete"}, "images_per_sec is missing"),
    "images_per_sec text": ({"images_per_sec": "fast"}, 'images_per_sec is "fast"'),
    "images_per_sec negative": ({"images_per_sec": -3.5}, "images_per_sec is -3.5"),
    "images_per_sec NaN": ({"images_per_sec": float("nan")}, "images_per_sec is NaN"),
    "images_per_sec true": ({"images_per_sec": True}, "images_per_sec is true"),
    "step_ms null": ({"step_ms": None}, "step_ms is null"),
    "step_ms a number": ({"step_ms": 12.5}, "step_ms is 12.5"),
    "step_ms median null": ({"step_ms": {"median": None}}, "step_ms.median is null"),
    "step_ms median 0": ({"step_ms": {"median": 0, "p10": 0, "p90": 0}}, "step_ms.median is 0"),
    "batch_size missing": ({"batch_size": "delete"}, "batch_size is missing, expected int"),
    "batch_size null": ({"batch_size": None}, "batch_size is null, expected int"),
    "batch_size text": ({"batch_size": "64"}, 'batch_size is "64", expected int'),
    "device missing": ({"device": "delete"}, "device is missing, expected str"),
    "channels_last text": ({"channels_last": "yes"}, 'channels_last is "yes", expected bool'),
}


@pytest.mark.parametrize("change, message", BROKEN.values(), ids=BROKEN.keys())
@pytest.mark.parametrize("side", ["A", "B"])
def test_a_broken_row_is_one_line_naming_the_file_and_the_field(tmp_path, capsys, change, message, side):
    bad = row(batch_size=4)
    for field, value in change.items():
        if value == "delete":
            del bad[field]
        else:
            bad[field] = value
    good = write(tmp_path / "good.json", [row(batch_size=2), row(batch_size=4)])
    broken = write(tmp_path / "broken.json", [row(batch_size=2), bad])
    line = refused(capsys, *((good, broken) if side == "B" else (broken, good)))
    assert f"{broken}: results[1]" in line and message in line, line


BROKEN_FILES = {
    "missing": (None, "does not exist"),
    "not JSON": ("{results: [", "is not a toolkit.bench results file"),
    "not UTF-8": (b"\xff\xfe\x00{", "is not a toolkit.bench results file"),
    "no results": ('{"environment": {}}', "is not a toolkit.bench results file (no 'results' list)"),
    "results null": ('{"results": null}', "no 'results' list"),
    "a list": ("[1, 2]", "no 'results' list"),
    "a row that is a number": ('{"results": [3]}', "results[0] is 3, not a row of results"),
    "a reference file": ('{"results": [{"side": "reference", "precision": "no", "status": "ok"}]}',
                         "results[0]: device is missing"),
}


@pytest.mark.parametrize("content, message", BROKEN_FILES.values(), ids=BROKEN_FILES.keys())
def test_a_file_that_is_not_results_is_one_line(tmp_path, capsys, content, message):
    path = tmp_path / "other.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    good = write(tmp_path / "good.json", [row()])
    line = refused(capsys, good, str(path))
    assert str(path) in line and message in line, line


def test_a_folder_is_one_line(tmp_path, capsys):
    good = write(tmp_path / "good.json", [row()])
    line = refused(capsys, good, str(tmp_path))
    assert str(tmp_path) in line and "cannot read it" in line, line


def test_the_same_configuration_twice_in_a_file_is_one_line(tmp_path, capsys):
    twice = write(tmp_path / "twice.json", [row(rate=100.0), row(rate=120.0)])
    line = refused(capsys, twice, twice)
    assert "results[0] and results[1] are the same configuration (cpu train model batch 2)" in line


def test_empty_results_compare_to_nothing(tmp_path, capsys):
    empty = write(tmp_path / "empty.json", [])
    code, out = compare(capsys, empty, write(tmp_path / "good.json", [row()]))
    assert code == 0 and "no configuration is in both files" in out
