"""User-facing errors: one line saying what is wrong and how to fix it, and a non-zero exit, never a traceback.

Light on purpose (the standard library only): a command installs its handling before it imports torch, so a
mistake or a Ctrl-C while the heavy modules load is one line too. What the processes of a run agree on lives in
`toolkit.agreement`.
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import sys
from collections.abc import Iterator

# The environment variable `accelerate launch` sets for the processes it starts (and plain torchrun does not).
ACCELERATE_LAUNCHED = "ACCELERATE_MIXED_PRECISION"
LAUNCHER_NOTE = " (accelerate launch reports this exit below; `accelerate launch -q` leaves out its traceback)"
SHOWN_PATH = 80  # characters of a path shown in a message: a name too long for the filesystem may run to thousands


class UserError(Exception):
    """A mistake the user can fix (a bad config value, a missing device, missing data, a broken checkpoint).

    `exit_code` follows the shell convention: 2 for bad usage (config, flags, devices), 1 otherwise.
    """

    exit_code = 1
    # Raised identically by every process (a config error, a stop all ranks agreed on): only rank 0 reports it.
    same_on_every_rank = False
    # About files every process of a machine reads alike (data, a checkpoint): each machine's first process
    # reports it, so a file missing on one machine of several is still named there.
    same_on_every_machine = False


class UsageError(UserError):
    exit_code = 2
    same_on_every_rank = True


class Interrupted(BaseException):  # noqa: N818 - like KeyboardInterrupt, which it generalises
    """A signal (SIGINT, SIGTERM, SIGHUP) that ends a command before its work has anything to save: raised from
    the signal handler (`toolkit.stopping.Signals`), so that every `with` and `finally` on the way out cleans up,
    and reported as one line with the shell's exit status for it, 128 + the signal's number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def one_line(error: BaseException) -> str:
    """An unexpected error as one line: its type and the first line of its message."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


def shown_path(path: object) -> str:
    """A path for a message, cut short in the middle when it is very long."""
    text = os.fsdecode(path) if isinstance(path, (str, bytes, os.PathLike)) else str(path)
    return text if len(text) <= SHOWN_PATH else f"{text[:SHOWN_PATH // 2]}...{text[-SHOWN_PATH // 2:]}"


def name_too_long(error: OSError) -> UsageError:
    """The filesystem's refusal of a long name, as a usage error naming the path and the limits."""
    where = error.filename if error.filename is not None else "a path given"
    try:
        limit = os.pathconf(os.getcwd(), "PC_NAME_MAX")
    except (OSError, ValueError):
        limit = 255
    return UsageError(f"{shown_path(where)}: a file name is too long for the filesystem (at most {limit} characters "
                      f"a name): choose a shorter path")


def report(prog: str, message: str, error: UserError) -> None:
    """Print `prog: error: message` on stderr, once for all processes (see UserError's flags); a closed stderr
    loses the line but never raises."""
    rank, local_rank = os.environ.get("RANK", "0"), os.environ.get("LOCAL_RANK", "0")
    if rank == "0":
        line = f"{prog}: error: {message}"
    elif not (error.same_on_every_rank or (error.same_on_every_machine and local_rank != "0")):
        line = f"{prog}: error (rank {rank}): {message}"
    else:
        return
    if ACCELERATE_LAUNCHED in os.environ:
        line += LAUNCHER_NOTE
    try:
        print(line, file=sys.stderr, flush=True)
    except OSError:  # the terminal or pipe is gone: the exit status still says it
        pass


@contextlib.contextmanager
def exit_on_user_error(prog: str = "toolkit") -> Iterator[None]:
    """Turn a UserError into `prog: error: ...` on stderr and its exit code; a name too long for the filesystem
    into a usage error; a Ctrl-C or a signal outside a training loop into `prog: interrupted by SIGINT` and 128 +
    the signal's number."""
    try:
        yield
    except UserError as error:
        report(prog, str(error), error)
        raise SystemExit(error.exit_code) from None
    except OSError as error:
        if error.errno != errno.ENAMETOOLONG:
            raise
        usage = name_too_long(error)
        report(prog, str(usage), usage)
        raise SystemExit(usage.exit_code) from None
    except (KeyboardInterrupt, Interrupted) as error:
        interrupted = error if isinstance(error, Interrupted) else Interrupted(signal.SIGINT)
        if os.environ.get("RANK", "0") == "0":
            with contextlib.suppress(OSError):
                print(f"{prog}: interrupted by {interrupted}", file=sys.stderr, flush=True)
        raise SystemExit(interrupted.exit_code) from None
