"""User-facing errors: one line saying what is wrong and how to fix it, and a non-zero exit, never a traceback."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator


class UserError(Exception):
    """A mistake the user can fix (a bad config value, a missing device, missing data, a broken checkpoint).

    `exit_code` follows the shell convention: 2 for bad usage (config, flags, devices), 1 otherwise.
    """

    exit_code = 1
    # Raised identically by every process (a config error, a stop all ranks agreed on): only rank 0 reports it.
    same_on_every_rank = False


class UsageError(UserError):
    exit_code = 2
    same_on_every_rank = True


@contextlib.contextmanager
def exit_on_user_error(prog: str = "toolkit") -> Iterator[None]:
    """Turn a UserError into `prog: error: ...` on stderr and its exit code."""
    try:
        yield
    except UserError as error:
        rank = os.environ.get("RANK", "0")
        if rank == "0":
            print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
        elif not error.same_on_every_rank:
            print(f"{prog}: error (rank {rank}): {error}", file=sys.stderr, flush=True)
        raise SystemExit(error.exit_code) from None
