"""What the training loop keeps on the device between host syncs.

A step only queues work: reading a loss (`.item()`) would make the host wait for the device, which then idles
until the host queues the next step. So each step adds its loss to a sum on the device, notes on the device the
first step whose loss was not finite (and tells the optimizer to skip that update there), and counts the steps
the fp16 gradient scaler skipped. `read()`, the one host sync, is called at log steps and at epoch ends.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from toolkit import devices


@dataclass(frozen=True)
class Reading:
    loss_sum: float  # this process's training loss summed over its images since the last reading
    images: int
    first_bad_step: int  # the first step (1-based) whose loss was not finite, 0 if none
    skipped_steps: int  # fp16 steps the gradient scaler skipped, since the start of this process


class StepTally:
    def __init__(self, device: torch.device, step: int = 0) -> None:
        self.dtype = devices.widest_float(device)
        self.loss_sum = torch.zeros((), dtype=self.dtype, device=device)
        self.first_bad_step = torch.zeros((), dtype=self.dtype, device=device)
        self.skipped_steps = torch.zeros((), dtype=self.dtype, device=device)
        self.step = torch.full((), step, dtype=self.dtype, device=device)  # the loop's step count, on the device
        self.images = 0
        self.step_bad: torch.Tensor | None = None

    def add(self, loss: torch.Tensor, images: int) -> None:
        """Count one batch's mean loss over its `images` (a step has one batch, or several with accumulation)."""
        bad = ~torch.isfinite(loss)
        self.step_bad = bad if self.step_bad is None else self.step_bad | bad
        self.loss_sum += torch.where(bad, 0.0, loss.to(self.dtype) * images)
        self.images += images

    def end_step(self) -> torch.Tensor:
        """Close an optimizer step: 1.0 (float32, on the device) if any of its losses was not finite, else 0.0."""
        self.step += 1
        bad, self.step_bad = self.step_bad, None
        self.first_bad_step.copy_(torch.where(bad & (self.first_bad_step == 0), self.step, self.first_bad_step))
        return bad.float()

    def add_skipped(self, skipped: torch.Tensor) -> None:
        self.skipped_steps += skipped.to(self.dtype)

    def peek(self) -> tuple[float, int]:
        """This process's loss sum and images since the last reading (one host sync), the window left open: for
        the live bar's first values, before the first log step."""
        return float(self.loss_sum), self.images

    def read(self) -> Reading:
        """The sums so far (one host sync), then start a new window of loss sums."""
        loss_sum, first_bad, skipped = torch.stack([self.loss_sum, self.first_bad_step, self.skipped_steps]).tolist()
        reading = Reading(loss_sum=loss_sum, images=self.images, first_bad_step=int(first_bad),
                          skipped_steps=int(skipped))
        self.loss_sum.zero_()
        self.images = 0
        return reading
