"""What the processes of a run agree on, so that none is left waiting in a collective for a peer that has given up:
a decision the main process makes (which folder, which checkpoint), a failure any process meets (missing data), and
work one process per machine does first (reading or downloading data)."""

from __future__ import annotations

import dataclasses
import os
import re
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from toolkit.errors import UsageError, UserError

T = TypeVar("T")


def several_processes() -> bool:
    """Whether this process is one of several in a process group (then collectives are needed to agree)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


GIL_HANDOVER_S = 0.1  # seconds: gloo's workers take the GIL within milliseconds


def end_process_group(accelerator: Any) -> None:
    """End the run's process group (and its trackers), last thing before the process exits.

    Gloo's worker threads drop a collective's tensors after the collective has returned, and dropping a tensor
    Python knows takes the GIL. A worker still waiting for it when the interpreter finalizes is ended inside that
    destructor, which aborts the process ("terminate called without an active exception", exit -6), most often on
    a process that exits right after its last collective. Sleeping hands the GIL to those threads first."""
    several = several_processes()
    accelerator.end_training()
    if several:
        time.sleep(GIL_HANDOVER_S)


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


# ------------------------------------------------------------------ several machines
def machine_index() -> int:
    """This machine's index in the run (torchrun's GROUP_RANK; 0 without a launcher)."""
    return int(os.environ.get("GROUP_RANK", os.environ.get("NODE_RANK", 0)))


def same_everywhere(values: dict[str, Any]) -> None:
    """A UsageError on every process unless every process was given the same `values` (flags whose value only the
    main process would use, such as --output-dir): another machine's value is never ignored without a word."""
    if not several_processes():
        return
    every: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(every, (machine_index(), values))
    main_machine, main_values = every[0]
    for machine, given in every[1:]:
        differ = [name for name in main_values if given.get(name) != main_values[name]]
        if differ:
            name = differ[0]
            raise UsageError(f"{name} differs between the processes: {main_values[name] or '(none)'!s} on machine "
                             f"{main_machine}, {given[name] or '(none)'!s} on machine {machine}: give every machine "
                             f"the same {name}")


def shared_with_every_machine(folder: Path, token: str | None) -> None:
    """Every machine's first process checks that it sees the file `token` names, which the main process has just
    written in `folder`: a run folder must be on storage all machines share (checkpoints are written by the main
    process and read by every process on resume). A machine that does not see it stops every process with one
    line, at start, rather than at the first resume."""
    if not several_processes():
        return
    problem = None
    first_here = os.environ.get("LOCAL_RANK", "0") == "0"
    if first_here and dist.get_rank() != 0 and token and not (folder / token).exists():
        problem = UsageError(f"--output-dir {folder} is not on storage that all machines share (machine "
                             f"{machine_index()} cannot see what the main process wrote there): put the run folder "
                             f"on a filesystem every machine mounts, at the same path")
        problem.same_on_every_rank = False
    raise_together(problem)


# ------------------------------------------------------------------ one read, every process
def from_main(value: Any, device: Any) -> Any:
    """The main process's `value` (CPU tensors in dicts, lists, tuples and dataclasses, and plain values) on every
    process: its tensors sent through the process group on `device` (NCCL's GPU or gloo's CPU) and given back on
    the CPU, the rest as one small object. A checkpoint that every process needs is then read from storage once,
    not once per process."""
    if not several_processes():
        return value
    tensors: list[Any] = []

    def hollow(tensor: torch.Tensor) -> _Slot:
        tensors.append(tensor)
        return _Slot(len(tensors) - 1, tuple(tensor.shape), tensor.dtype)

    skeleton = [_replaced(value, torch.Tensor, hollow) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(skeleton, src=0)
    slots: list[_Slot] = []
    _replaced(skeleton[0], _Slot, slots.append)
    received = []
    for slot in slots:
        tensor = tensors[slot.index].to(device) if dist.get_rank() == 0 else \
            torch.empty(slot.shape, dtype=slot.dtype, device=device)
        dist.broadcast(tensor, src=0)
        received.append(tensor.cpu())  # where `checkpoint.load` puts them (the random states must be on the CPU)
    return _replaced(skeleton[0], _Slot, lambda slot: received[slot.index])


@dataclass(frozen=True)
class _Slot:
    """Where a tensor goes back: its place in the order sent, its shape and dtype."""

    index: int
    shape: tuple[int, ...]
    dtype: Any


def _replaced(value: Any, kind: type, replace: Callable[[Any], Any]) -> Any:
    """`value` with every `kind` inside it (through dicts, lists, tuples and dataclasses) replaced by
    `replace(it)`, in a fixed order."""
    if isinstance(value, kind):
        return replace(value)
    if isinstance(value, dict):
        return {key: _replaced(item, kind, replace) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_replaced(item, kind, replace) for item in value)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.replace(value, **{f.name: _replaced(getattr(value, f.name), kind, replace)
                                             for f in dataclasses.fields(value) if f.init})
    return value
