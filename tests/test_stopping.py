"""Signals set a flag once; the handlers are restored on close."""

import os
import signal

from toolkit.stopping import StopControl


def test_a_signal_sets_the_flag_once_and_close_restores_the_handlers():
    before = signal.getsignal(signal.SIGTERM)
    said = []
    stop = StopControl(announce=said.append)
    try:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # a launcher forwarding another signal: the first one stands
        assert stop.signum == signal.SIGTERM
        assert said == ["SIGTERM received: finishing this step, saving a checkpoint, then exiting"]
    finally:
        stop.close()
    assert signal.getsignal(signal.SIGTERM) == before
