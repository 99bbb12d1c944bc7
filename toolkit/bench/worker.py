"""Cases in fresh processes: which cases share a process, and the protocol between the parent and a worker.

The parent writes JOB (a JSON file: the cases and what earlier workers learnt, such as FLOPs per image) and runs
`python -m toolkit.bench.worker JOB`; the worker measures the cases in order and rewrites JOB.out after each one
with the rows so far, what it learnt and facts about itself (torch threads, device name, CUDA and cuDNN). A
worker that dies leaves the rows it finished; the parent makes an error row for each case it did not."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from toolkit.bench.plan import Case
from toolkit.bench.results import blank_row


def process_groups(cases: list[Case]) -> list[list[Case]]:
    """One process per case on the CPU (its peak RSS is the case's own); one per device and precision (and
    compile) elsewhere, where the allocator's peak is reset per case and a process costs seconds to start.
    Accelerate holds one precision per process."""
    groups: dict[tuple[Any, ...], list[Case]] = {}
    for index, case in enumerate(cases):
        key = (index,) if case.device == "cpu" else (case.device, case.precision, case.compile)
        groups.setdefault(key, []).append(case)
    return list(groups.values())


def run_in_processes(cases: list[Case], known: dict[str, Any], announce: Callable[[str], None] = print,
                     workers: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Each group of cases in a fresh worker process; results in case order. `known` gains what the workers
    learnt, `workers` each device's worker facts."""
    rows = []
    workers = {} if workers is None else workers
    for group in process_groups(cases):
        announce(f"measuring {group[0].label()}" + (f" and {len(group) - 1} more" if len(group) > 1 else ""))
        with tempfile.TemporaryDirectory(prefix="toolkit-bench-job-") as scratch:
            job = Path(scratch) / "job.json"
            job.write_text(json.dumps({"cases": [asdict(c) for c in group], "known": known}))
            result = subprocess.run([sys.executable, "-m", "toolkit.bench.worker", str(job)],
                                    capture_output=True, text=True)
            out = job.with_suffix(".out")
            done = json.loads(out.read_text()) if out.is_file() else {"rows": [], "known": known, "worker": {}}
        known.update(done["known"])
        if done["worker"]:
            workers[group[0].device] = done["worker"]
        for case in group[len(done["rows"]):]:
            row = blank_row(case)
            row["message"] = f"worker process {describe_exit(result.returncode)} before finishing this case"
            done["rows"].append(row)
        if result.returncode != 0 or any(row["status"] == "error" for row in done["rows"]):
            sys.stderr.write(result.stderr[-4000:])
        for row in done["rows"]:
            announce(f"  {row['status']}: {summary(row)}")
        rows.extend(done["rows"])
    return rows


def work(job_path: Path) -> int:
    """The worker's side: run the job's cases, rewriting JOB.out after each one."""
    import torch

    from toolkit.bench.measure import run_cases

    job = json.loads(job_path.read_text())
    known = job["known"]
    cases = [Case(**fields) for fields in job["cases"]]
    out_path = job_path.with_suffix(".out")
    rows: list[dict[str, Any]] = []

    def save(row: dict[str, Any]) -> None:
        rows.append(row)
        worker = {"torch_threads": torch.get_num_threads(), "device_name": row["device_name"]}
        if cases[0].device == "cuda":
            worker.update(cuda=torch.version.cuda, cudnn=torch.backends.cudnn.version())
        out_path.write_text(json.dumps({"rows": rows, "known": known, "worker": worker}))

    run_cases(cases, known, on_row=save)
    return 0


def describe_exit(returncode: int) -> str:
    if returncode == -9:
        return "was killed (SIGKILL: the kernel's out-of-memory killer?)"
    if returncode < 0:
        return f"died of signal {-returncode}"
    return f"exited with status {returncode}"


def summary(row: dict[str, Any]) -> str:
    if row["status"] == "ok":
        return f"{row['images_per_sec']:,.1f} images/s, {row['step_ms']['median']:.1f} ms/step"
    return row["message"]


if __name__ == "__main__":
    sys.exit(work(Path(sys.argv[1])))
