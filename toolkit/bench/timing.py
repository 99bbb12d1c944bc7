"""Timed windows on `devices.clock` (the one clock that waits for the device): the window built on it, the
model-only windows through `torch.utils.benchmark.Timer`, and the paired trainer/model windows that are ours;
a fixed number of windows, or as many as fill a time budget."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from toolkit import devices

MAX_REPEATS = 100  # a budget never asks for more pairs than this (a fast device, short windows)


class Timed(NamedTuple):
    """Timed windows of one pipeline: the steps in each, and the seconds each took."""

    steps: int
    seconds: list[float]


def timed(run: Callable[[int], Any], device: torch.device | str) -> Callable[[int], float]:
    """`run(count)` as a timed window: seconds from an idle device to the end of the work queued in it."""
    now = devices.clock(device)

    def window(count: int) -> float:
        started = now()  # the window opens on an idle device...
        run(count)
        return now() - started  # ...and closes when the work queued in it is done

    return window


def repeated(step: Callable[[], Any]) -> Callable[[int], None]:
    def run(count: int) -> None:
        for _ in range(count):
            step()

    return run


def timer_windows(step: Callable[[], Any], device: torch.device | str, warmup: int, steps: int, repeats: int,
                  budget_s: float = 0.0, warmed: Callable[[float], None] = lambda seconds: None) -> Timed:
    """`repeats` windows of `steps` calls of `step` after `warmup` untimed calls, by `torch.utils.benchmark.Timer`
    (which runs max(steps // 100, 2) untimed calls before each window). With `budget_s`, Timer's own
    `blocked_autorange` instead: windows of as many calls as make timing overhead negligible, until they add up
    to `budget_s`. `warmed` gets the seconds a call took in the warm-up."""
    timer = benchmark_timer("step()", {"step": step}, device)
    if warmup:
        warmed(timer.timeit(warmup).raw_times[0] / warmup)
    if budget_s:
        measured = timer.blocked_autorange(min_run_time=budget_s)
        return Timed(measured.number_per_run, measured.raw_times)
    return Timed(steps, [timer.timeit(steps).raw_times[0] for _ in range(repeats)])


def benchmark_timer(stmt: str, names: dict[str, Any], device: torch.device | str) -> Any:
    """A `torch.utils.benchmark.Timer` of `stmt` on `clock`, with the thread count the trainer set (Timer's
    default is one thread)."""
    # imported here: torch.utils.benchmark imports torch.utils.cpp_extension, which warns on stderr at import on a
    # machine with the CUDA toolkit and no GPU; only the worker processes measure
    from torch.utils.benchmark import Timer

    return Timer(stmt=stmt, globals=names, timer=devices.clock(device), num_threads=torch.get_num_threads())


def paired_windows(window: Callable[[int], float], partner: Callable[[int], float], warmup: int, steps: int,
                   repeats: int, budget_s: float = 0.0,
                   warmed: Callable[[float], None] = lambda seconds: None) -> tuple[Timed, Timed]:
    """Windows of `steps` steps of `window` (the trainer pipeline) after `warmup` untimed steps, each paired with a
    window of `partner` (the model-only step) right before or after it in the same process, the order
    alternating, so the drift of a shared machine's speed hits both alike. `repeats` pairs; with `budget_s`, at
    least `repeats` and then more until all the windows add up to `budget_s` (at most MAX_REPEATS). `warmed`
    gets the seconds a pair of steps took in the warm-up."""
    if warmup:
        warmed((window(warmup) + partner(warmup)) / warmup)
    own, other = [], []
    while len(own) < repeats or (budget_s and sum(own) + sum(other) < budget_s and len(own) < MAX_REPEATS):
        if len(own) % 2:  # alternate which goes first, so neither always follows the other
            other.append(partner(steps))
        own.append(window(steps))
        if len(other) < len(own):
            other.append(partner(steps))
    return Timed(steps, own), Timed(steps, other)


def spread(values: list[float]) -> dict[str, float]:
    """Median, 10th and 90th percentiles (linear interpolation between closest ranks, numpy's default)."""
    if len(values) < 2:  # statistics.quantiles needs two points before Python 3.13
        return {"median": values[0], "p10": values[0], "p90": values[0]}
    deciles = statistics.quantiles(values, n=10, method="inclusive")
    return {"median": statistics.median(values), "p10": deciles[0], "p90": deciles[-1]}
