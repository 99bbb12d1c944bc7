"""What the processes of a run agree on, so that none is left waiting in a collective for a peer that has given up:
a decision the main process makes (which folder, which checkpoint), a failure any process meets (missing data), and
work one process per machine does first (reading or downloading data)."""

from __future__ import annotations

import os
import re
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch.distributed as dist

from toolkit.errors import UserError

T = TypeVar("T")


def several_processes() -> bool:
    """Whether this process is one of several in a process group (then collectives are needed to agree)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def decided_on_main(decide: Callable[[], T], main_process: bool) -> T:
    """`decide()` run on the main process, its answer (which must pickle) shared with every process.

    When it fails, every process fails with it: the main process raises its own error, the others a UserError with
    its message and exit status that they do not print (the main process reports it)."""
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


# ------------------------------------------------------------------ a process that is gone
# What gloo and NCCL say when a peer's end of a collective is gone (killed, crashed, its machine lost).
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "connectFullMesh",
             "NCCL communicator was aborted", "Socket Timeout", "ProcessGroupGloo", "ProcessGroupNCCL")


class LostPeer(UserError):
    """Another process of the run is gone: each survivor says so once (its machine's view of who died)."""

    same_on_every_machine = True


def peers() -> tuple[tuple[str, int], ...]:
    """(host, pid) of every process of the run, by rank: gathered once at start, to name the one that dies."""
    me = (socket.gethostname(), os.getpid())
    if not several_processes():
        return (me,)
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, me)
    return tuple(tuple(peer) for peer in every)


def lost_peer(error: BaseException, known: tuple[tuple[str, int], ...], newest: Path | None,
              resume_flags: str) -> LostPeer | None:
    """`error` as one line when it says a collective lost a peer (else None): which process died, when it ran on
    this machine, and where the run can continue from."""
    if len(known) < 2 or not (isinstance(error, dist.DistError) or
                              (isinstance(error, RuntimeError) and any(m in str(error) for m in PEER_GONE))):
        return None
    from toolkit.rundir import process_exists

    host = socket.gethostname()
    dead = [rank for rank, (peer_host, pid) in enumerate(known) if peer_host == host and not process_exists(pid)]
    who = (f"process {', '.join(map(str, dead))} of this run ended" if dead else
           "another process of this run ended, or its machine can no longer be reached")
    kept = f"the last good checkpoint is {newest}" if newest else "no checkpoint had been saved yet"
    return LostPeer(f"{who}, so this one stops too ({one_line_of(error)}); {kept}: resume with {resume_flags}")


def one_line_of(error: BaseException) -> str:
    """The error's first line without gloo's source location (`[.../pair.cc:545] Read error ...`), cut short."""
    line = next((text.strip() for text in str(error).splitlines() if text.strip()), type(error).__name__)
    line = re.sub(r"^\[[^\]]*\]\s*", "", line)
    return line if len(line) <= 100 else line[:97] + "..."
