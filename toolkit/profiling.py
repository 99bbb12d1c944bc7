"""`profile_steps: "A:B"`: record optimizer steps A to B (both included, counted from 1 as logged) with
torch.profiler, write a trace that Perfetto (https://ui.perfetto.dev) or chrome://tracing opens, and keep a
table of the operators that took the most time themselves (self time), printed at the end of the run.

The trace holds the host's activity (CPU) and, on CUDA, the GPU's kernels. PyTorch's profiler has no MPS
activity: on a Mac the trace shows the host's side only (Instruments shows the GPU's, via torch.mps.profiler).
Only the main process records. Off, it costs one integer comparison per step.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

TOP_OPERATORS = 15


class StepProfiler:
    def __init__(self, steps: tuple[int, int] | None, folder: Path, device: torch.device) -> None:
        self.first, self.last = steps or (0, -1)
        self.folder, self.device = folder, device
        self.profile: profile | None = None
        self.recorded_last = self.first
        self.trace: Path | None = None
        self.table = ""

    def before_step(self, step: int) -> None:
        """`step`: the optimizer step about to run, counted from 1."""
        if step == self.first:
            activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
            self.profile = profile(activities=activities, record_shapes=True)
            self.profile.__enter__()

    def after_step(self, step: int) -> None:
        if self.profile is not None:
            self.recorded_last = step
            if step >= self.last:
                self.stop()

    def stop(self) -> None:
        """End the recording (at its last step, or earlier if the run stops first) and write the trace."""
        if self.profile is None:
            return
        prof, self.profile = self.profile, None
        prof.__exit__(None, None, None)
        self.folder.mkdir(parents=True, exist_ok=True)
        # named for the steps recorded: a run that ends first records fewer than asked
        self.trace = self.folder / f"trace-steps-{self.first}-{self.recorded_last}.json"
        prof.export_chrome_trace(str(self.trace))
        sort_by = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        self.table = prof.key_averages().table(sort_by=sort_by, row_limit=TOP_OPERATORS)
