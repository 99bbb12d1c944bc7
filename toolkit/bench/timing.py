"""Timed windows on `devices.clock` (the one clock that waits for the device): the window built on it, the
model-only windows through `torch.utils.benchmark.Timer`, and the paired trainer/model windows that are ours."""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import torch

from toolkit import devices


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


def timer_windows(step: Callable[[], Any], device: torch.device | str, warmup: int, steps: int,
                  repeats: int) -> list[float]:
    """Seconds of `repeats` windows of `steps` calls of `step`, after `warmup` untimed calls, by
    `torch.utils.benchmark.Timer`, which runs max(steps // 100, 2) untimed calls before each window."""
    timer = benchmark_timer("step()", {"step": step}, device)
    if warmup:
        timer.timeit(warmup)
    return [timer.timeit(steps).raw_times[0] for _ in range(repeats)]


def benchmark_timer(stmt: str, names: dict[str, Any], device: torch.device | str) -> Any:
    """A `torch.utils.benchmark.Timer` of `stmt` on `clock`, with the thread count the trainer set (Timer's
    default is one thread)."""
    # imported here: torch.utils.benchmark imports torch.utils.cpp_extension, which warns on stderr at import on a
    # machine with the CUDA toolkit and no GPU; only the worker processes measure
    from torch.utils.benchmark import Timer

    return Timer(stmt=stmt, globals=names, timer=devices.clock(device), num_threads=torch.get_num_threads())


def paired_windows(window: Callable[[int], float], partner: Callable[[int], float], warmup: int, steps: int,
                   repeats: int) -> tuple[list[float], list[float]]:
    """Seconds of `repeats` windows of `steps` steps of `window` (the trainer pipeline) after `warmup` untimed
    steps, each paired with a window of `partner` (the model-only step) right before or after it in the same
    process, the order alternating, so the drift of a shared machine's speed hits both alike."""
    window(warmup)
    partner(warmup)
    own, other = [], []
    for repeat in range(repeats):
        if repeat % 2:  # alternate which goes first, so neither always follows the other
            other.append(partner(steps))
        own.append(window(steps))
        if not repeat % 2:
            other.append(partner(steps))
    return own, other


def spread(values: list[float]) -> dict[str, float]:
    """Median, 10th and 90th percentiles (linear interpolation between closest ranks, numpy's default)."""
    if len(values) < 2:  # statistics.quantiles needs two points before Python 3.13
        return {"median": values[0], "p10": values[0], "p90": values[0]}
    deciles = statistics.quantiles(values, n=10, method="inclusive")
    return {"median": statistics.median(values), "p10": deciles[0], "p90": deciles[-1]}
