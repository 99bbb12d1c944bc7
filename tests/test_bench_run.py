"""A bench run as its user lives it: the quick default and its estimate, said before anything is measured; the
results file, in the user's own folder unless --json names one, rewritten as each case finishes; and a stop
(Ctrl-C, SIGTERM) that ends the worker and keeps every finished row. The measuring itself is replaced here
(test_bench.py measures for real); the slow tests at the end stop real runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from conftest import ROOT, mnist_root

from toolkit.bench import cli, measure, worker
from toolkit.bench.plan import FULL, QUICK, Case, plan
from toolkit.bench.progress import Progress
from toolkit.bench.results import blank_row


def case(mode="train", **changes) -> Case:
    fields = dict(device="cpu", mode=mode, pipeline="both", batch_size=32, precision="bf16", channels_last=True,
                  compile=False, image_size=224, warmup=1, steps=1, repeats=3, budget_s=6.0)
    return Case(**{**fields, **changes})


def rows_of(found: Case, rate: float = 100.0) -> list[dict]:
    """The rows a case makes when measured: ok, with every number the table reads."""
    rows = []
    for pipeline in found.pipelines():
        row = blank_row(found, pipeline)
        step_ms = 1000 * found.batch_size / rate
        row.update(status="ok", images_per_sec=rate, images_per_sec_windows=[rate],
                   step_ms={"median": step_ms, "p10": step_ms, "p90": step_ms}, peak_memory={"cpu_peak_rss": 2**30},
                   gflop_per_image=5.561, achieved_tflops=rate * 5.561e-3, peak_tflops=0.4,
                   peak_source="measured 2048x2048 matmul, bf16", mfu=rate * 5.561e-3 / 0.4,
                   trainer_over_model=0.98 if pipeline == "trainer" else None)
        rows.append(row)
    return rows


def planned(*flags: str) -> list[Case]:
    return plan(cli.build_parser().parse_args(["--device", "cpu", *flags]), announce=lambda line: None)[1]


@pytest.fixture
def users_folder(tmp_path, monkeypatch):
    """A user's data folder ($XDG_DATA_HOME) and a working directory, both empty."""
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data-home"))
    (tmp_path / "checkout").mkdir()
    monkeypatch.chdir(tmp_path / "checkout")
    return tmp_path / "data-home" / "toolkit" / "bench"


@pytest.fixture
def measuring(monkeypatch, capsys):
    """cli.main with the workers replaced: each case gets rows_of(case), handed over as a worker hands them, and
    `measuring.seen` holds what the console said before the first case started. `measuring.stop_after` cases, a
    SIGINT."""
    class Fake:
        seen = ""
        stop_after: int | None = None
        files: list[dict] = []

    def run_in_processes(cases, known, progress, workers, stop):
        Fake.seen = capsys.readouterr().out
        for index, found in enumerate(cases):
            if index == Fake.stop_after:
                raise worker.Stopped(signal.SIGINT)
            progress.starting(index)
            progress.finished(index, rows_of(found))
            Fake.files.append(json.loads(progress.path.read_text()))

    monkeypatch.setattr(cli, "run_in_processes", run_in_processes)
    monkeypatch.setattr(cli, "environment", lambda command, workers: {"command": command})
    if mnist_root() is None:
        pytest.skip("MNIST is not on this machine (the trainer pipeline reads it): set TOOLKIT_DATA_DIR")
    return Fake


def test_the_default_is_a_quick_answer_sized_by_time():
    cases = planned()
    # train and infer, each the trainer pipeline paired with the model-only step: two cases, two processes
    assert [(c.mode, c.pipeline) for c in cases] == [("train", "both"), ("infer", "both")]
    assert all((c.batch_size, c.image_size, c.warmup, c.steps, c.repeats, c.budget_s) ==
               (QUICK["cpu"].batch_size, 224, 1, 1, 3, QUICK["cpu"].budget_s) for c in cases)
    estimate = Progress(cases, lambda line: None).estimate_s(cases)
    assert estimate is not None and estimate < 60  # "about a minute on a 2-core CPU" at most


def test_full_and_the_window_flags_are_what_they_say():
    full = planned("--full")
    assert {(c.batch_size, c.warmup, c.steps, c.repeats, c.budget_s) for c in full} == \
        {(FULL.batch_size, FULL.warmup, FULL.steps, FULL.repeats, 0.0)}
    assert Progress(full, lambda line: None).estimate_s(full) is None  # fixed windows: known after a warm-up
    exact = planned("--repeats", "4", "--steps", "2")
    assert {(c.steps, c.repeats, c.budget_s) for c in exact} == {(2, 4, 0.0)}  # no budget: exactly 4 windows
    longer = planned("--steps", "3", "--batch-size", "8,4", "--mode", "train")
    assert [(c.batch_size, c.steps, c.budget_s) for c in longer] == [(4, 3, 6.0), (8, 3, 6.0)]


def test_the_plan_and_the_estimate_are_said_before_measuring(users_folder, measuring, capsys):
    assert cli.main(["--device", "cpu", "--no-chart"]) == 0
    said = measuring.seen.splitlines()
    assert said[0] == "plan: 2 cases in 2 processes: cpu; train, infer; batch 32; bf16; 224 px"
    assert any(line.startswith("estimate: about ") and line.endswith(" s") for line in said), said
    results = next(line for line in said if line.startswith("results (written as each case finishes): "))
    assert results.endswith(".json") and str(users_folder) in results


def test_results_go_to_the_users_folder_not_the_working_directory(users_folder, measuring, capsys):
    assert cli.main(["--device", "cpu", "--no-chart"]) == 0  # the chart goes beside the JSON: test_bench_chart.py
    out = capsys.readouterr().out
    [written] = users_folder.glob("cpu-*.json")
    assert f"results: {written}" in out
    assert list(Path.cwd().iterdir()) == []  # nothing in the checkout
    assert len(json.loads(written.read_text())["results"]) == 4


def test_each_case_reaches_the_file_as_it_finishes(tmp_path, measuring):
    path = tmp_path / "r.json"
    assert cli.main(["--device", "cpu", "--json", str(path), "--no-chart"]) == 0
    first, second = measuring.files
    assert (first["run"], len(first["results"])) == ({"cases": 2, "finished": 1, "stopped_by": None}, 2)
    assert (second["run"]["finished"], len(second["results"])) == (2, 4)


def test_a_stop_keeps_every_finished_row_and_says_so(tmp_path, measuring, capsys):
    measuring.stop_after = 1
    path = tmp_path / "r.json"
    assert cli.main(["--device", "cpu", "--json", str(path), "--no-chart"]) == 130
    document = json.loads(path.read_text())
    assert document["run"] == {"cases": 2, "finished": 1, "stopped_by": "SIGINT"}
    assert [(r["mode"], r["pipeline"], r["status"]) for r in document["results"]] == [("train", "model", "ok"),
                                                                                     ("train", "trainer", "ok")]
    out = capsys.readouterr().out
    assert "stopped by SIGINT after 1 of 2 cases: their rows are in" in out
    assert "trainer/model" in out and "0.980" in out  # the finished rows' table


def test_the_table_fits_100_columns_with_one_peak_line(tmp_path, measuring, capsys):
    assert cli.main(["--device", "cpu", "--json", str(tmp_path / "r.json"), "--no-chart"]) == 0
    out = capsys.readouterr().out
    table = out[out.index("AlexNet on MNIST"):]
    assert max(len(line) for line in table.splitlines() if str(tmp_path) not in line) <= 100
    assert [line for line in table.splitlines() if "TFLOP/s," in line] == [
        "peak: cpu bf16 0.400 TFLOP/s, a 2048x2048 matmul timed in each case's process."]
    for column in ("images/s:", "step ms:", "model:", "trainer/model", "memory:", "TFLOP/s:"):
        assert column in table, column  # the footnote says what each column is


def test_output_paths_are_checked_before_anything_is_measured(tmp_path, measuring, capsys):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--device", "cpu", "--json", str(tmp_path / "a-file" / "r.json")])
    assert exit_.value.code == 2 and "is a file, not a folder" in capsys.readouterr().err
    assert measuring.seen == ""  # never started


@pytest.mark.parametrize("text, message", [
    ("learning_rate: 0.1\n", "unknown key 'learning_rate'"),
    ("batch_size: 0\n", "batch_size"),
])
def test_a_bad_config_is_refused_before_measuring(tmp_path, measuring, capsys, text, message):
    config = tmp_path / "bad.yaml"
    config.write_text(text)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--device", "cpu", "--config", str(config), "--json", str(tmp_path / "r.json")])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err, err
    assert measuring.seen == "" and not (tmp_path / "r.json").exists()


def test_progress_says_each_case_its_warm_up_and_the_time_left():
    said = []
    cases = [case(), case(mode="infer")]
    progress = Progress(cases, said.append)
    progress.starting(0)
    progress.warmed(0, 2.0)
    progress.finished(0, rows_of(cases[0], rate=50.0))
    assert said[0] == "[1/2] cpu train trainer paired with model batch 32 bf16 channels_last 224px"
    # at least 3 pairs of 1 step at 2 s a pair: the 6 s budget
    assert said[1] == "  warm-up: 2 s a step (both pipelines); this case about 6 s more, the run about 22 s more"
    assert said[2].startswith("  done in 0 s: model 50.0 images/s, trainer 50.0 images/s (trainer/model 0.980)")
    assert said[2].endswith(" left")


def test_the_trainers_signal_handlers_never_see_a_signal_meant_for_the_worker():
    got = []
    before = signal.signal(signal.SIGTERM, lambda signum, frame: got.append("default"))
    try:
        with measure.signals_as_before():
            signal.signal(signal.SIGTERM, lambda signum, frame: got.append("trainer"))  # as the Trainer does
            # to this thread (a worker's other threads hold the signals from its start: worker.start_worker)
            signal.pthread_kill(threading.main_thread().ident, signal.SIGTERM)
            assert got == []  # held back while the trainer is built
        assert got == ["default"]  # the handler from before the trainer, as a worker's default ends it
    finally:
        signal.signal(signal.SIGTERM, before)


class Sleeper:
    """A worker that finished its first case (its report says so) and goes on with the second until told to stop."""

    def __init__(self, command, **kwargs):
        job = Path(command[-1])
        first = Case(**json.loads(job.read_text())["cases"][0])
        job.with_suffix(".out").write_text(json.dumps({"rows": rows_of(first), "done": 1, "known": {},
                                                       "worker": {}, "warmed": []}))
        self.returncode = None
        self.signals = []

    def poll(self):
        return self.returncode

    def wait(self, timeout=None):
        if self.returncode is None:
            raise subprocess.TimeoutExpired("worker", timeout)
        return self.returncode

    def terminate(self):
        self.signals.append("SIGTERM")
        self.returncode = -signal.SIGTERM


def test_a_stop_ends_the_worker_and_passes_on_the_rows_it_finished(monkeypatch):
    started = []
    monkeypatch.setattr(worker.subprocess, "Popen", lambda *a, **k: started.append(Sleeper(*a, **k)) or started[-1])
    finished = []

    class Seen(worker.Silent):
        def finished(self, index, rows):
            finished.append((index, [r["pipeline"] for r in rows]))

    stop = worker.StopRequest()
    stop.note(signal.SIGTERM, None)
    stop.note(signal.SIGINT, None)  # a repeat changes nothing
    gpu_cases = [case(device="cuda", batch_size=b) for b in (64, 128)]  # one worker for both
    with pytest.raises(worker.Stopped) as stopped:
        worker.run_group(gpu_cases, 0, {}, Seen(), {}, stop)
    assert stopped.value.signum == signal.SIGTERM
    assert started[0].signals == ["SIGTERM"]
    assert finished == [(0, ["model", "trainer"])]


# --- real runs, stopped


def bench_command(json_path: Path) -> list[str]:
    """Two tiny cases, a process each: the second is still starting or measuring when the first's rows land."""
    return [sys.executable, "-m", "toolkit.bench", "--device", "cpu", "--mode", "train", "--pipeline", "model",
            "--batch-size", "2,4", "--image-size", "65", "--warmup", "0", "--steps", "1", "--repeats", "1",
            "--json", str(json_path), "--no-chart"]


def processes_holding(marker: str) -> list[str]:
    """The command lines of running processes that hold `marker` (zombies have none)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                command = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:
                continue
            if marker in command:
                found.append(command)
    return found


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc").is_dir(), reason="lists processes through /proc (Linux)")
@pytest.mark.parametrize("sig, to_group, code", [(signal.SIGINT, True, 130), (signal.SIGTERM, False, 143)],
                         ids=["ctrl-c to the terminal's process group", "SIGTERM to the bench alone"])
def test_a_stop_after_the_first_case_keeps_it_and_leaves_no_worker(tmp_path, sig, to_group, code):
    if mnist_root() is None:
        pytest.skip("MNIST is not on this machine: set TOOLKIT_DATA_DIR")
    marker = f"bench-stop-{uuid.uuid4().hex[:12]}"
    scratch = tmp_path / marker  # the workers' job files are under TMPDIR: their command lines hold the marker
    scratch.mkdir()
    path = scratch / "results.json"
    env = {**os.environ, "TMPDIR": str(scratch), "PYTHONUNBUFFERED": "1", "PYTHONPATH": str(ROOT)}
    bench = subprocess.Popen(bench_command(path), cwd=ROOT, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        while not (path.is_file() and json.loads(path.read_text())["run"]["finished"] == 1):
            assert bench.poll() is None and time.monotonic() < deadline, "the first case never finished"
            time.sleep(0.1)
        os.killpg(bench.pid, sig) if to_group else bench.send_signal(sig)
        out, err = bench.communicate(timeout=60)
    finally:
        if bench.poll() is None:
            os.killpg(bench.pid, signal.SIGKILL)
    assert bench.returncode == code, out + err
    document = json.loads(path.read_text())
    assert document["run"] == {"cases": 2, "finished": 1, "stopped_by": signal.Signals(sig).name}
    [row] = document["results"]
    assert (row["batch_size"], row["status"]) == (2, "ok")
    assert f"stopped by {signal.Signals(sig).name} after 1 of 2 cases: their rows are in {path}" in out
    assert "AlexNet on MNIST" in out and "Traceback" not in out + err
    assert processes_holding(marker) == []  # the second case's worker was ended with the run
