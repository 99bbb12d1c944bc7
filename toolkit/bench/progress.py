"""What a run tells as it goes: its plan and an estimate before measuring, then a line as each case starts, when
its warm-up shows how long a step takes, and when its rows arrive, with the time left."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from toolkit.bench.plan import START_S, Case
from toolkit.bench.tables import number
from toolkit.bench.worker import process_groups

PIPELINES_SAID = {
    "both": "trainer and model-only, their windows alternating in one process (a row each)",
    "trainer": "trainer, its windows alternating with the model-only step's in one process",
    "model": "the model-only step alone (torch.utils.benchmark.Timer)",
}
PARENT_S = 5.0  # the parent's own seconds: imports, the environment report, the chart


def duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 90 else f"{seconds / 60:.0f} min"


def plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}es" if word.endswith("s") else f"{count} {word}s"


def windows_said(case: Case) -> str:
    warmup = f"{plural(case.warmup, 'warm-up step')}, then " if case.warmup else ""
    if not case.budget_s:
        return f"{warmup}{plural(case.repeats, 'window')} of {plural(case.steps, 'step')}"
    if not case.paired():
        return f"{warmup}Timer's windows until about {case.budget_s:g} s of them"
    return f"{warmup}windows of {plural(case.steps, 'step')} until about {case.budget_s:g} s of them " \
           f"(at least {case.repeats} pairs)"


def values(cases: list[Case], field: str, shown: Callable[[Any], str] = str) -> str:
    return ", ".join(dict.fromkeys(shown(getattr(case, field)) for case in cases))


class Progress:
    """The lines a run prints about itself, through `announce`."""

    def __init__(self, cases: list[Case], announce: Callable[[str], None]) -> None:
        self.cases, self.announce = cases, announce
        self.first_in_process = {id(group[0]) for group in process_groups(cases)}
        self.case_started = self.started = time.perf_counter()
        self.case_s: list[float] = []  # each finished case's wall time, its process's start included

    def plan(self) -> None:
        """The plan and the estimate, before anything is measured."""
        cases = self.cases
        processes = len(self.first_in_process)
        self.announce(f"plan: {plural(len(cases), 'case')} in {plural(processes, 'process')}: "
                      f"{values(cases, 'device')}; {values(cases, 'mode')}; batch {values(cases, 'batch_size')}; "
                      f"{values(cases, 'precision', lambda p: 'fp32' if p == 'no' else p)}; "
                      f"{values(cases, 'image_size')} px")
        for case in {case.device: case for case in cases}.values():
            where = f"{case.device} " if len({c.device for c in cases}) > 1 else ""
            self.announce(f"  {where}pipelines: {PIPELINES_SAID[case.pipeline]}")
            self.announce(f"  {where}windows: {windows_said(case)}")
        estimate = self.estimate_s(cases)
        self.announce(f"estimate: about {duration(estimate)}" if estimate is not None else
                      "estimate: after the first warm-up (the windows are fixed, the time a step takes is not known)")

    def estimate_s(self, cases: list[Case]) -> float | None:
        """Seconds `cases` should take: a process's start-up, then the windows' budget and a quarter more for the
        warm-up and the peak matmul. None when a case's windows are fixed rather than timed."""
        if any(not case.budget_s for case in cases):
            return None
        return PARENT_S + sum(START_S[case.device] * (id(case) in self.first_in_process) + 1.25 * case.budget_s
                              for case in cases)

    def starting(self, index: int) -> None:
        self.case_started = time.perf_counter()
        self.announce(f"[{index + 1}/{len(self.cases)}] {self.cases[index].label()}")

    def warmed(self, index: int, step_s: float) -> None:
        """The warm-up's time a step (a pair of steps when paired) makes the case's windows an estimate."""
        case = self.cases[index]
        windows_s = case.repeats * case.steps * step_s
        if case.budget_s:
            windows_s = max(windows_s, case.budget_s)
        left = windows_s + sum(self.typical_s(later, windows_s) for later in self.cases[index + 1:])
        self.announce(f"  warm-up: {step_s:.3g} s a step{' (both pipelines)' if case.paired() else ''}; "
                      f"this case about {duration(windows_s)} more, the run about {duration(left)} more")

    def typical_s(self, case: Case, windows_s: float) -> float:
        """A later case's seconds, taken to be like the one just warmed up."""
        return START_S[case.device] * (id(case) in self.first_in_process) + windows_s

    def finished(self, index: int, rows: list[dict[str, Any]]) -> None:
        now = time.perf_counter()
        self.case_s.append(now - self.case_started)
        left = len(self.cases) - index - 1
        tail = f"; about {duration(left * sum(self.case_s) / len(self.case_s))} left" if left else ""
        self.announce(f"  done in {duration(self.case_s[-1])}: {outcome(rows)}{tail}")


def outcome(rows: list[dict[str, Any]]) -> str:
    """A case's rows in a few words: each pipeline's images/s and their ratio, or what went wrong."""
    failed = next((row for row in rows if row["status"] != "ok"), None)
    if failed:
        return f"{failed['status']}: {failed['message']}"
    said = ", ".join(f"{row['pipeline']} {number(row['images_per_sec'])} images/s" for row in rows)
    ratio = next((row["trainer_over_model"] for row in rows if row.get("trainer_over_model")), None)
    return said + (f" (trainer/model {ratio:.3f})" if ratio else "")
