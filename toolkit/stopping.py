"""Why a run stops before its epochs are done, and the signals that ask it to.

Signals, one rule for a whole command (`Signals`): SIGTERM (a scheduler's preemption), SIGINT (Ctrl-C) and SIGHUP
(a closed terminal, a dropped SSH session). Until training starts, a signal ends the command at once: it raises
`Interrupted`, the `with` blocks on the way out clean up (a new run folder goes, an existing one is left as it
was), and the command exits 128 + the signal's number with one line. From the first step on, a signal only sets a
flag: the trainer finishes its step, saves a checkpoint and exits with 128 + the number (143, 130, 129). Repeats
are ignored, since launchers forward the signal a process already got from the terminal or the scheduler, and that
must not cut the save short (SIGKILL still stops at once). One process reads the flag after every step; several
agree on it at the trainer's sync points (log steps, evaluations, checkpoints, epoch ends), so all stop at the same
step.

The other reasons (`StopPolicy`): the time limit (the run stops early enough to save), `max_steps`, a target
accuracy reached, and no better accuracy for `early_stop_patience` evaluations. Each `Stop` knows its message, its
exit status and whether the run is to be continued (`run.json` says `stopped`) or is done (`finished`).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import FrameType
from typing import Any

from toolkit.errors import Interrupted, UserError

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
# Requests processes make at sync points, in the order they win: a scheduler's preemption first, then a closed
# terminal, then Ctrl-C, then the time limit.
REQUESTS = ("SIGTERM", "SIGHUP", "SIGINT", "time_limit")
RESUMABLE = frozenset(REQUESTS)  # stop reasons that leave a run to be continued


class NonFiniteLoss(UserError):
    same_on_every_rank = True  # agreed at a sync point: every rank raises it at the same step


class Signals:
    """The stop signals of one command, from `__init__` (first thing in `main`) to `close`."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.announce: Callable[[str], None] | None = None  # set while training: a signal then asks, not ends
        self.previous = {sig: signal.getsignal(sig) for sig in SIGNALS}
        for sig in SIGNALS:
            signal.signal(sig, self._handle)

    def training(self, announce: Callable[[str], None] | None) -> None:
        """From here on a signal asks the loop to stop (`announce`, if given, says so at once)."""
        self.announce = announce or (lambda line: None)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self.announce is None:
            raise Interrupted(signum)
        if self.signum is None:
            self.signum = signum
            self.announce(f"{signal.Signals(signum).name} received: finishing this step, saving a checkpoint, "
                          f"then exiting")

    @property
    def name(self) -> str | None:
        return signal.Signals(self.signum).name if self.signum else None

    def close(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


@dataclass(frozen=True)
class Stop:
    """Why and where a run stopped: a signal's name, `time_limit`, `max_steps`, `target_accuracy` or
    `early_stop`."""

    reason: str
    step: int

    @property
    def resumable(self) -> bool:
        return self.reason in RESUMABLE

    @property
    def exit_code(self) -> int:
        """128 + the signal's number for a signal (the shell's convention); 0 for the others, the time limit
        included (the run did what it was told)."""
        return 128 + signal.Signals[self.reason].value if self.reason.startswith("SIG") else 0

    @property
    def status(self) -> str:
        """What `run.json` says: `stopped` (to be continued) or `finished`."""
        return "stopped" if self.resumable else "finished"

    def message(self, config: Any, resume: str) -> str | None:
        """The line the console ends with (None: the summary says it all); `resume` is the command line's
        flags that continue the run."""
        if self.reason.startswith("SIG"):
            return f"stopped at step {self.step}; resume with {resume}"
        if self.reason == "time_limit":
            return f"stopped at step {self.step} before the time limit ({config.time_limit}); resume with {resume}"
        if self.reason == "early_stop":
            return (f"stopped early at step {self.step}: no better accuracy in the last "
                    f"{config.early_stop_patience} evaluations")
        if self.reason == "target_accuracy":
            return f"reached the target accuracy {config.target_accuracy:.2%} at step {self.step}"
        return None


def first_request(requests: list[str | None]) -> str | None:
    """The reason to act on when processes give theirs (REQUESTS' order)."""
    for reason in REQUESTS:
        if reason in requests:
            return reason
    return None


class StopPolicy:
    """Every reason to stop early, asked by the loop after each step and each evaluation. `save_seconds` says how
    long a checkpoint takes (the last one timed, else an estimate), so the time limit leaves room for one."""

    def __init__(self, config: Any, signals: Signals | None, save_seconds: Callable[[], float]) -> None:
        self.config = config
        self.signals = signals
        self.save_seconds = save_seconds
        self.started = self.checked_at = time.perf_counter()  # the time limit counts from the process's start
        self.stop: Stop | None = None

    def request(self) -> str | None:
        """This process's own reason to stop now: a signal it received, or the time limit coming up (room left for
        twice the time between checks and a save)."""
        if self.signals is not None and self.signals.name:
            return self.signals.name
        now = time.perf_counter()
        interval, self.checked_at = now - self.checked_at, now
        if now - self.started + 2 * interval + self.save_seconds() >= self.config.time_limit_s:
            return "time_limit"
        return None

    def agree(self, requests: list[str | None], step: int) -> bool:
        """At a sync point: what every process asked for (`request`), gathered; the first in REQUESTS' order
        wins, unless the run already stops. Whether this made the run stop."""
        reason = first_request(requests)
        if reason and self.stop is None:
            self.stop = Stop(reason, step)
            return True
        return False

    def after_step(self, step: int, alone: bool) -> bool:
        """Whether to stop after optimizer step `step`. One process (`alone`) acts on its own requests at once;
        several act on what they agreed at the last sync point, so that all stop at the same step."""
        if alone and self.stop is None:
            self.agree([self.request()], step)
        if self.stop is None and self.config.max_steps and step >= self.config.max_steps:
            self.stop = Stop("max_steps", step)
        return self.stop is not None

    def after_evaluation(self, step: int, accuracy: float, evaluations_since_best: int) -> None:
        """A target reached, or the patience run out."""
        if self.stop is not None:
            return
        if self.config.target_accuracy and accuracy >= self.config.target_accuracy:
            self.stop = Stop("target_accuracy", step)
        elif self.config.early_stop_patience and evaluations_since_best >= self.config.early_stop_patience:
            self.stop = Stop("early_stop", step)
