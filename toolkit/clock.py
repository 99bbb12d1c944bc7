"""Where a run's time goes: training time (the steps alone: set-up, evaluation and checkpoints excluded) and wall
time, each for this session and the run as a whole, and the logging window whose images/s the console shows.

Every reading waits for the device first (`devices.synchronize`), so the work queued before it is counted; readings
are taken only at the trainer's sync points, never inside a step.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from toolkit import devices


class RunClock:
    def __init__(self, device: torch.device, wall_before: float = 0.0) -> None:
        self.device = device
        self.session_started = time.perf_counter()
        self.wall_before = wall_before  # earlier sessions' wall time (a resumed run's)
        self.running_since: float | None = None  # training, since then
        self.window_started = 0.0
        self.windows = 0  # logging windows read this session: the first holds the warm-up (cuDNN's choices...)
        # this process, this session: training time, images and steps (the per-process table at the end)
        self.session_seconds, self.session_images, self.session_steps = 0.0, 0, 0
        self.epoch_mark = (0.0, 0)  # the run's training seconds and the epoch's images when this epoch (re)started
        self.epoch_seconds = 0.0  # training time of the epoch so far, this session
        self.epoch_rate = 0.0  # its images/s over all processes
        self.window_steps = 0  # steps in the logging window so far
        self.step_seconds: float | None = None  # training seconds a step, smoothed over logging windows
        self.evaluation_seconds = 0.0  # what the last evaluation took

    def start(self) -> None:
        """Training (re)starts: the training clock runs, and a logging window opens."""
        self.running_since = self.window_started = time.perf_counter()
        self.window_steps = 0

    def pause(self) -> float:
        """Training stops for now (an evaluation, a checkpoint, the epoch's end): the training seconds since
        `start`, the device's queued work included."""
        if self.running_since is None:
            return 0.0
        devices.synchronize(self.device)
        now = time.perf_counter()
        elapsed, self.running_since = now - self.running_since, None
        self.session_seconds += elapsed
        return elapsed

    def stepped(self, images: int) -> None:
        self.session_images += images
        self.session_steps += 1
        self.window_steps += 1

    def epoch_begins(self, train_seconds: float, epoch_images: int) -> None:
        self.epoch_mark = (train_seconds, epoch_images)

    def epoch_so_far(self, train_seconds: float, epoch_images: int, slowest: Callable[[float], float]) -> None:
        """Note the epoch's training time and speed so far: all processes' images over the slowest one's time
        (`slowest` gathers it)."""
        seconds, images = train_seconds - self.epoch_mark[0], epoch_images - self.epoch_mark[1]
        self.epoch_seconds = seconds
        self.epoch_rate = images / max(slowest(seconds), 1e-9)

    def read_window(self) -> tuple[float, bool]:
        """(seconds of the logging window so far, whether it is this session's first), the device's queued work
        included; `restart_window` opens the next once the logging is done."""
        devices.synchronize(self.device)
        first = self.windows == 0
        self.windows += 1
        seconds = time.perf_counter() - self.window_started
        if self.window_steps:
            per_step = seconds / self.window_steps
            # smoothed, so that the ETA does not jump with each window; a session's first window (warm-up) counts
            # only until a steady one replaces it
            self.step_seconds = per_step if self.step_seconds is None or first or self.windows == 2 else \
                0.7 * self.step_seconds + 0.3 * per_step
        return seconds, first

    def window_so_far(self) -> float:
        """Seconds of the logging window so far, the device's queued work included, the window left open (and,
        before any window was read, a first time a step for the ETA, which the first reading replaces)."""
        devices.synchronize(self.device)
        seconds = time.perf_counter() - self.window_started
        if self.windows == 0 and self.window_steps:
            self.step_seconds = seconds / self.window_steps
        return seconds

    def restart_window(self) -> None:
        """What the logging took is not the next window's."""
        self.window_started = time.perf_counter()
        self.window_steps = 0

    def run_eta(self, steps_left: int, evaluations_left: int) -> float | None:
        """Seconds until the run's end: its steps at the smoothed time a step, and its evaluations at the last
        one's time; None until a window has been timed."""
        if self.step_seconds is None:
            return None
        return steps_left * self.step_seconds + evaluations_left * self.evaluation_seconds

    def wall_seconds(self) -> float:
        """The run's wall time so far: earlier sessions' and this one's, set-up included."""
        return self.wall_before + time.perf_counter() - self.session_started
