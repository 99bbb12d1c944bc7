"""Who reports a user's mistake, and how a process's refusal reaches the others (in one process here; under
several processes in test_distributed.py)."""

import pytest

from toolkit.agreement import decided_on_main, raise_together
from toolkit.checkpoint import CheckpointError
from toolkit.errors import UsageError, UserError, exit_on_user_error


@pytest.mark.parametrize("error, rank, local_rank, shown", [
    (UserError("disk full"), "0", "0", "prog: error: disk full"),
    (UserError("disk full"), "3", "1", "prog: error (rank 3): disk full"),  # may be this process's alone
    (UsageError("bad flag"), "3", "0", ""),  # every process parsed the same flags: rank 0 says it
    (CheckpointError("no such folder"), "3", "1", ""),  # the first process of this machine says it
    (CheckpointError("no such folder"), "2", "0", "prog: error (rank 2): no such folder"),  # a second machine
])
def test_each_mistake_is_reported_once_where_it_was_met(monkeypatch, capsys, error, rank, local_rank, shown):
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("LOCAL_RANK", local_rank)
    with pytest.raises(SystemExit) as exited, exit_on_user_error("prog"):
        raise error
    assert exited.value.code == error.exit_code
    assert capsys.readouterr().err.strip() == shown


def test_the_main_process_decides_and_its_own_error_is_raised_as_is():
    assert decided_on_main(lambda: "runs/a", main_process=True) == "runs/a"
    refusal = CheckpointError("runs/b is not a checkpoint folder")

    def refuse():
        raise refusal

    with pytest.raises(CheckpointError) as raised:
        decided_on_main(refuse, main_process=True)
    assert raised.value is refusal


def test_an_error_met_is_raised_and_none_is_not():
    raise_together(None)
    with pytest.raises(UsageError, match="bad"):
        raise_together(UsageError("bad"))
