"""User-facing errors: one line saying what is wrong and how to fix it, and a non-zero exit, never a traceback."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch.distributed as dist

T = TypeVar("T")


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


def one_line(error: BaseException) -> str:
    """An unexpected error as one line: its type and the first line of its message."""
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


@contextlib.contextmanager
def exit_on_user_error(prog: str = "toolkit") -> Iterator[None]:
    """Turn a UserError into `prog: error: ...` on stderr and its exit code."""
    try:
        yield
    except UserError as error:
        rank, local_rank = os.environ.get("RANK", "0"), os.environ.get("LOCAL_RANK", "0")
        if rank == "0":
            print(f"{prog}: error: {error}", file=sys.stderr, flush=True)
        elif not (error.same_on_every_rank or (error.same_on_every_machine and local_rank != "0")):
            print(f"{prog}: error (rank {rank}): {error}", file=sys.stderr, flush=True)
        raise SystemExit(error.exit_code) from None


def several_processes() -> bool:
    """Whether this process is one of several in a process group (then collectives are needed to agree)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def decided_on_main(decide: Callable[[], T], main_process: bool) -> T:
    """`decide()` run on the main process, its answer (which must pickle) shared with every process.

    When it fails, every process fails with it, so none is left waiting in a collective for a peer that has
    given up: the main process raises its own error, the others a UserError with its message and exit status
    that they do not print (the main process reports it)."""
    outcome: list = [None, None, 1]  # the answer, or the failure's message and exit status
    failure: BaseException | None = None
    if main_process:
        try:
            outcome[0] = decide()
        except Exception as error:
            failure = error
            outcome[1:] = ([str(error), error.exit_code] if isinstance(error, UserError)
                           else [f"{type(error).__name__} on the main process: {error}", 1])
    if several_processes():
        dist.broadcast_object_list(outcome, src=0)
    if failure is not None:
        raise failure
    if outcome[1] is not None:
        shared = UserError(outcome[1])
        shared.exit_code, shared.same_on_every_rank = outcome[2], True
        raise shared
    return outcome[0]


def raise_together(error: UserError | None) -> None:
    """Every process calls this with the error it met (or None): if any met one, every process raises, so none
    goes on to a collective its peers have left. An error that is the main process's own is reported once, by
    the main process; an error only some processes met, by each of them."""
    messages = [str(error) if error else None]
    if several_processes():
        messages = [None] * dist.get_world_size()
        dist.all_gather_object(messages, str(error) if error else None)
    if error is not None:
        error.same_on_every_rank = error.same_on_every_rank or str(error) == messages[0]
        raise error
    failed = next((message for message in messages if message), None)
    if failed is not None:
        shared = UserError(failed)
        shared.same_on_every_rank = True  # the process that met it reports it
        raise shared


def main_first(accelerator: Any, work: Callable[[], T]) -> T:
    """`work()` (reading or downloading data, say) on each machine's first process, then on its others; a
    UserError any process meets is raised on every process (`raise_together`)."""
    answer, failure = None, None
    with accelerator.local_main_process_first():
        try:
            answer = work()
        except UserError as error:
            failure = error
    raise_together(failure)
    return answer
