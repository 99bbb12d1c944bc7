"""Cases in fresh processes: which cases share a process, the protocol between the parent and a worker, and
ending a worker when the parent is told to stop.

The parent writes JOB (a JSON file: the cases and what earlier workers learnt, such as FLOPs per image) and runs
`python -m toolkit.bench.worker JOB`; the worker measures the cases in order and rewrites JOB.out (atomically)
after each one and after each warm-up, with the rows so far, the cases done, what it learnt and facts about itself
(torch threads, device name, CUDA and cuDNN). The parent reads JOB.out while the worker runs, so rows reach the
results file as each case finishes. A worker that dies leaves the rows it finished; the parent makes error rows
for each case it did not. A SIGTERM or SIGINT to the parent ends its worker (`Stopped`), keeping the rows."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from types import FrameType
from typing import IO, Any, Protocol

from toolkit.bench.plan import Case
from toolkit.bench.results import blank_row
from toolkit.files import write_atomic

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
POLL_S = 0.25  # how often the parent reads its worker's report
END_GRACE_S = 10  # seconds a worker told to stop (SIGTERM) has before SIGKILL


class Stopped(BaseException):
    """A SIGTERM or SIGINT reached the parent while it measured. Not an Exception: nothing on the way out may
    take it for a failed case."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class StopRequest:
    """The first SIGTERM or SIGINT the parent got while measuring, acted on where the parent can stop cleanly
    (`check`, between reads of its worker's report), not wherever the signal lands."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def note(self, signum: int, _frame: FrameType | None) -> None:
        if self.signum is None:  # a repeat (a launcher forwarding what a terminal sent) changes nothing
            self.signum = signum

    def check(self) -> None:
        if self.signum is not None:
            raise Stopped(self.signum)


@contextlib.contextmanager
def stopped_by_signals() -> Iterator[StopRequest]:
    """While measuring, SIGTERM and SIGINT make the parent end its worker and raise Stopped, keeping the finished
    rows: by default SIGTERM would end the parent at once, its worker running on and the rows unwritten."""
    request = StopRequest()
    before = {sig: signal.signal(sig, request.note) for sig in STOP_SIGNALS}
    try:
        yield request
        request.check()
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)


class Progress(Protocol):
    """What the parent tells as cases go: a case starts, its warm-up gives the time a step takes, its rows arrive."""

    def starting(self, index: int) -> None: ...
    def warmed(self, index: int, step_s: float) -> None: ...
    def finished(self, index: int, rows: list[dict[str, Any]]) -> None: ...


class Silent:
    def starting(self, index: int) -> None:
        pass

    def warmed(self, index: int, step_s: float) -> None:
        pass

    def finished(self, index: int, rows: list[dict[str, Any]]) -> None:
        pass


def process_groups(cases: list[Case]) -> list[list[Case]]:
    """One process per case on the CPU (its peak RSS is the case's own); one per device and precision (and
    compile) elsewhere, where the allocator's peak is reset per case and a process costs seconds to start.
    Accelerate holds one precision per process."""
    groups: dict[tuple[Any, ...], list[Case]] = {}
    for index, case in enumerate(cases):
        key = (index,) if case.device == "cpu" else (case.device, case.precision, case.compile)
        groups.setdefault(key, []).append(case)
    return list(groups.values())


def run_in_processes(cases: list[Case], known: dict[str, Any], progress: Progress | None = None,
                     workers: dict[str, Any] | None = None,
                     stop: StopRequest | None = None) -> list[dict[str, Any]]:
    """Each group of cases in a fresh worker process; rows in case order, given to `progress.finished` case by
    case as they arrive. `known` gains what the workers learnt, `workers` each device's worker facts. A `stop`
    request ends the worker and raises Stopped, once every row it finished is passed on."""
    progress = progress or Silent()
    workers = {} if workers is None else workers
    stop = stop or StopRequest()
    rows: list[dict[str, Any]] = []
    first = 0
    for group in process_groups(cases):
        stop.check()
        rows.extend(run_group(group, first, known, progress, workers, stop))
        first += len(group)
    return rows


def run_group(group: list[Case], first: int, known: dict[str, Any], progress: Progress,
              workers: dict[str, Any], stop: StopRequest) -> list[dict[str, Any]]:
    """One worker process for `group` (cases `first`, `first + 1`... of the run). Ends the worker on the way out
    whatever happens (a Stopped above all), having passed on every row it finished."""
    with tempfile.TemporaryDirectory(prefix="toolkit-bench-job-") as scratch:
        job = Path(scratch) / "job.json"
        job.write_text(json.dumps({"cases": [asdict(c) for c in group], "known": known}))
        report = Report(job.with_suffix(".out"), group, first, progress, known, workers)
        progress.starting(first)
        with open(Path(scratch) / "stderr.txt", "w+") as stderr:
            process = start_worker(job, stderr)
            try:
                while process.poll() is None:
                    with contextlib.suppress(subprocess.TimeoutExpired):
                        process.wait(timeout=POLL_S)
                    report.read()
                    stop.check()
            finally:
                end(process)
                report.read()
            stderr.seek(0)
            errors = stderr.read()
    rows = report.rows
    for index in range(report.done, len(group)):
        message = f"worker process {describe_exit(process.returncode)} before finishing this case"
        failed = [{**blank_row(group[index], pipeline), "message": message} for pipeline in group[index].pipelines()]
        rows.extend(failed)
        progress.finished(first + index, failed)
        if index + 1 < len(group):
            progress.starting(first + index + 1)
    if process.returncode != 0 or any(row["status"] == "error" for row in rows):
        sys.stderr.write(errors[-4000:])
    return rows


def start_worker(job: Path, stderr: IO[str]) -> subprocess.Popen:
    """`python -m toolkit.bench.worker JOB`, started with SIGTERM and SIGINT held back (a child inherits its
    parent's signal mask): every thread it makes (numpy's, torch's) holds them too, so the one that takes them is
    its main thread, once it has built the trainer and put the default handlers back (measure.signals_as_before).
    A stop sent while it starts up ends it then."""
    held = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS) if hasattr(signal, "pthread_sigmask") else None
    try:
        return subprocess.Popen([sys.executable, "-m", "toolkit.bench.worker", str(job)],
                                stdout=subprocess.DEVNULL, stderr=stderr)
    finally:
        if held is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)


def end(process: subprocess.Popen) -> None:
    """Make sure the worker is gone: SIGTERM (its default: it ends at once), then SIGKILL after a grace."""
    if process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(timeout=END_GRACE_S)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


class Report:
    """The parent's reading of a worker's JOB.out: new rows and warm-ups passed on to `progress` once each, and
    what the worker learnt and is (into `known` and `workers`) before its rows."""

    def __init__(self, path: Path, group: list[Case], first: int, progress: Progress, known: dict[str, Any],
                 workers: dict[str, Any]) -> None:
        self.path, self.group, self.first, self.progress = path, group, first, progress
        self.known, self.workers = known, workers
        self.rows: list[dict[str, Any]] = []
        self.done = 0
        self.warmed = 0

    def read(self) -> None:
        try:
            latest = json.loads(self.path.read_text())
        except (OSError, ValueError):  # not written yet (it is replaced whole, never half-written)
            return
        self.known.update(latest["known"])
        if latest["worker"]:
            self.workers[self.group[0].device] = latest["worker"]
        for index, step_s in latest["warmed"][self.warmed:]:
            self.progress.warmed(self.first + index, step_s)
        self.warmed = len(latest["warmed"])
        while self.done < latest["done"]:
            found = latest["rows"][len(self.rows):len(self.rows) + len(self.group[self.done].pipelines())]
            self.rows.extend(found)
            self.progress.finished(self.first + self.done, found)
            self.done += 1
            if self.done < len(self.group):
                self.progress.starting(self.first + self.done)


def work(job_path: Path) -> int:
    """The worker's side: run the job's cases, rewriting JOB.out after each warm-up and each case."""
    import torch

    from toolkit.bench.measure import run_cases

    job = json.loads(job_path.read_text())
    known = job["known"]
    cases = [Case(**fields) for fields in job["cases"]]
    out_path = job_path.with_suffix(".out")
    state: dict[str, Any] = {"rows": [], "done": 0, "known": known, "worker": {}, "warmed": []}

    def save() -> None:
        write_atomic(out_path, json.dumps(state))

    def finished(rows: list[dict[str, Any]]) -> None:
        state["rows"].extend(rows)
        state["done"] += 1
        state["worker"] = {"torch_threads": torch.get_num_threads(), "device_name": rows[0]["device_name"]}
        if cases[0].device == "cuda":
            state["worker"].update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
        save()

    def warmed(index: int, step_s: float) -> None:
        state["warmed"].append([index, step_s])
        save()

    try:
        run_cases(cases, known, on_rows=finished, warmed=warmed)
    except KeyboardInterrupt:  # Ctrl-C reaches the worker too: the parent reports it
        return 130
    return 0


def describe_exit(returncode: int) -> str:
    if returncode == -9:
        return "was killed (SIGKILL: the kernel's out-of-memory killer?)"
    if returncode < 0:
        return f"died of signal {-returncode}"
    return f"exited with status {returncode}"


if __name__ == "__main__":
    sys.exit(work(Path(sys.argv[1])))
