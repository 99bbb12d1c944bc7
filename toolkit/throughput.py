"""How fast the loop trains, measured without slowing it down.

Per logging window: the device time spent preparing batches and in the optimizer step, from timing events
recorded around each (CUDA and MPS events on the device's own clock, no sync when recorded; plain timestamps on
the CPU, where the work is done when the host gets there), read after the sync a log step makes anyway; the
achieved TFLOP/s (images/s x training FLOPs per image) and the fraction of the device's peak (MFU, with the same
peak table as `toolkit.bench`); and the peak device memory.
"""

from __future__ import annotations

from typing import Any

import torch

from toolkit import devices, peaks
from toolkit.model import flops_per_image


class StepTimer:
    """Events around the data path and the step. `data_ready()` after a batch is prepared, `step_done()` after
    its optimizer step; `read()`, after a sync, gives the window's (data ms, step ms) per step."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.last_done = self._event()  # the end of the step before: where the next batch's preparation starts
        self.marks: list[tuple[Any, Any]] = []

    def _event(self) -> Any:
        event = devices.timing_event(self.device)
        event.record()
        return event

    def data_ready(self) -> None:
        self.ready = self._event()

    def step_done(self) -> None:
        done = self._event()
        self.marks.append((self.last_done, self.ready, done))
        self.last_done = done

    def read(self) -> tuple[float, float] | None:
        """(data ms, step ms) per step since the last read; None if no step ran. Call after a sync."""
        if not self.marks:
            return None
        data = sum(start.elapsed_time(ready) for start, ready, _ in self.marks)
        step = sum(ready.elapsed_time(done) for _, ready, done in self.marks)
        steps = len(self.marks)
        self.marks = []
        return data / steps, step / steps

    def restart(self) -> None:
        """Forget the time since the last step (an evaluation, a checkpoint): it is neither data nor step."""
        self.last_done = self._event()
        self.marks = []


class Efficiency:
    """Training FLOPs per image and the device's peak, found once (`measure`, before the training clock starts),
    to turn images/s into TFLOP/s and MFU."""

    def __init__(self, device: torch.device, precision: str, image_size: int, tf32: bool = True) -> None:
        self.device, self.precision, self.image_size, self.tf32 = device, precision, image_size, tf32
        self.flops_per_image: float | None = None

    def measure(self) -> None:
        """Count the FLOPs and find the peak, once: called before the training clock starts."""
        if self.flops_per_image is None:
            self.flops_per_image = float(flops_per_image(self.image_size)[1])
            peak = peaks.device_peak(self.device, devices.name(self.device), self.precision, self.tf32)
            self.peak, self.peak_source = peak["peak_tflops"], peak["peak_source"]

    def __call__(self, images_per_sec: float) -> dict[str, float]:
        self.measure()
        achieved = images_per_sec * self.flops_per_image / 1e12
        return {"tflops": achieved, "mfu": achieved / self.peak}
