"""Signals, one rule for a whole command: before training they end it (Interrupted), during training they set a
flag once; the handlers are restored on close. And the stop policy: which reason wins, the time limit, max_steps."""

import os
import signal
from types import SimpleNamespace

import pytest

from toolkit.errors import Interrupted
from toolkit.stopping import Signals, Stop, StopPolicy, first_request


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
def test_before_training_a_signal_ends_the_command_and_during_it_asks_once(sig):
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    said = []
    signals = Signals()
    try:
        with pytest.raises(Interrupted) as raised:
            os.kill(os.getpid(), sig)
        assert raised.value.signum == sig and raised.value.exit_code == 128 + sig
        signals.training(said.append)
        os.kill(os.getpid(), sig)
        os.kill(os.getpid(), signal.SIGINT if sig != signal.SIGINT else signal.SIGTERM)  # forwarded: ignored
        assert signals.signum == sig and signals.name == signal.Signals(sig).name
        assert said == [f"{signal.Signals(sig).name} received: finishing this step, saving a checkpoint, then exiting"]
    finally:
        signals.close()
    assert {s: signal.getsignal(s) for s in before} == before


def test_several_processes_say_nothing_at_the_signal_and_agree_later():
    signals = Signals()
    try:
        signals.training(None)  # the trainer's choice under several processes: the sync point says it
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.name == "SIGTERM"
    finally:
        signals.close()


def test_stop_reasons_agree_in_priority_order():
    assert first_request([None, "time_limit", "SIGINT"]) == "SIGINT"
    assert first_request(["SIGINT", "SIGTERM"]) == "SIGTERM"
    assert first_request(["SIGINT", "SIGHUP"]) == "SIGHUP"
    assert first_request([None, None]) is None


@pytest.mark.parametrize("reason, status, code, says", [
    ("SIGTERM", "stopped", 143, "stopped at step 7; resume with --resume auto --output-dir 'my runs/a'"),
    ("SIGHUP", "stopped", 129, "stopped at step 7; resume with"),
    ("time_limit", "stopped", 0, "stopped at step 7 before the time limit (90m); resume with"),
    ("early_stop", "finished", 0, "stopped early at step 7: no better accuracy in the last 3 evaluations"),
    ("target_accuracy", "finished", 0, "reached the target accuracy 99.00% at step 7"),
    ("max_steps", "finished", 0, None),
])
def test_each_stop_knows_its_status_exit_and_line(reason, status, code, says):
    stop = Stop(reason, 7)
    config = SimpleNamespace(time_limit="90m", early_stop_patience=3, target_accuracy=0.99)
    line = stop.message(config, "--resume auto --output-dir 'my runs/a'")
    assert (stop.status, stop.exit_code) == (status, code)
    assert line is None if says is None else line.startswith(says)


def test_the_time_limit_leaves_room_for_a_save_and_max_steps_stops_at_its_step():
    config = SimpleNamespace(time_limit_s=100.0, max_steps=5, target_accuracy=0.0, early_stop_patience=0)
    policy = StopPolicy(config, signals=None, save_seconds=lambda: 60.0)
    assert not policy.after_step(1, alone=True)
    policy.started -= 45  # 45 s in: a 60 s save no longer fits before the limit
    assert policy.after_step(2, alone=True) and policy.stop == Stop("time_limit", 2)
    patient = StopPolicy(config, signals=None, save_seconds=lambda: 0.0)
    assert [patient.after_step(step, alone=False) for step in (4, 5)] == [False, True]
    assert patient.stop == Stop("max_steps", 5)
