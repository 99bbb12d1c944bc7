"""When training must stop early: a SIGTERM or SIGINT (preemption, Ctrl-C), or a non-finite loss.

A signal only sets a flag; the trainer finishes its step, saves and exits with 128 + the signal number (143 for
SIGTERM, 130 for SIGINT). Repeats are ignored: launchers forward the signal a process already got from the
terminal or the scheduler, and that must not cut the save short (SIGKILL still stops at once). One process reads
the flag after every step; several processes agree on it at the trainer's sync points (log steps, evaluations,
checkpoints, epoch ends), so every rank stops at the same step.
"""

from __future__ import annotations

import signal
from types import FrameType

from toolkit.errors import UserError

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class NonFiniteLoss(UserError):
    same_on_every_rank = True  # agreed at a sync point: every rank raises it at the same step


class StopControl:
    def __init__(self, announce=print) -> None:
        self.announce = announce
        self.signum: int | None = None
        self.previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.signum is None:
            self.signum = signum
            self.announce(f"{signal.Signals(signum).name} received: finishing this step, saving a checkpoint, "
                          f"then exiting")

    def close(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
