"""When training must stop: a SIGTERM/SIGINT (preemption, Ctrl-C) or a non-finite loss, agreed by all processes.

A signal only sets a flag; the trainer finishes its step, saves and exits with 128 + the signal number (143 for
SIGTERM, 130 for SIGINT). Repeats are ignored: launchers forward the signal a process already got from the
terminal or the scheduler, and that must not cut the save short (SIGKILL still stops at once). Under DDP the
flags of all processes are combined at every step with one small all-reduce on a CPU (gloo) group, so every
rank stops at the same step and a NaN on one rank stops them all before the optimizer step.
"""

from __future__ import annotations

import signal
from types import FrameType

import torch
import torch.distributed as dist

from toolkit.errors import UserError

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class NonFiniteLoss(UserError):
    same_on_every_rank = True  # agreed through agree_step


class StopControl:
    def __init__(self, rank: int = 0, world_size: int = 1, announce=print) -> None:
        self.rank, self.world_size = rank, world_size
        self.announce = announce
        self.signum: int | None = None
        self.group = dist.new_group(backend="gloo") if world_size > 1 else None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
            self.announce(f"{signal.Signals(signum).name} received: finishing this step, saving a checkpoint, "
                          f"then exiting")

    def agree_step(self, loss_is_finite: bool, loss_sum: float,
                   count: int) -> tuple[list[int], int | None, float, int]:
        """One all-reduce per step. Returns, the same on every rank: the ranks whose loss is not finite, the
        signal any rank received (or None), and the step's loss sum and image count over all ranks."""
        world = self.world_size
        # [not finite on rank 0..W-1, SIGTERM seen, SIGINT seen, loss sum, images]: all combine by addition
        flags = torch.zeros(world + 4, dtype=torch.float64)
        flags[self.rank] = float(not loss_is_finite)
        flags[world] = float(self.signum == signal.SIGTERM)
        flags[world + 1] = float(self.signum == signal.SIGINT)
        flags[world + 2] = loss_sum
        flags[world + 3] = count
        if self.group is not None:
            dist.all_reduce(flags, op=dist.ReduceOp.SUM, group=self.group)
        bad_ranks = [rank for rank in range(world) if flags[rank] > 0]
        signum = signal.SIGTERM if flags[world] > 0 else signal.SIGINT if flags[world + 1] > 0 else None
        return bad_ranks, signum, float(flags[world + 2]), int(flags[world + 3])

    def agree(self) -> int | None:
        """The signal any rank received, or None: for the checks between epochs."""
        return self.agree_step(True, 0.0, 0)[1]

    def close(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
