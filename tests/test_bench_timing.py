"""The timed window and the windows of a case: every clock reading waits for the device through
devices.synchronize (so MPS is timed as CUDA is), the model-only windows are Timer's, the paired windows
alternate, and the spread is numpy's linear percentiles."""

import pytest
import torch

from toolkit import devices
from toolkit.bench import timing


@pytest.fixture
def syncs(monkeypatch):
    """Each devices.synchronize call, with the device it was given."""
    calls = []
    real = devices.synchronize

    def synchronize(device):
        calls.append(str(device))
        real(device)

    monkeypatch.setattr(devices, "synchronize", synchronize)
    return calls


def test_a_window_is_synchronised_at_both_ends(syncs):
    work = []
    seconds = timing.timed(lambda count: work.append(count), "cpu")(3)
    assert work == [3] and seconds >= 0
    assert syncs == ["cpu", "cpu"]


def test_model_windows_are_timers_on_the_synchronising_clock(syncs):
    calls = []
    steps, seconds = timing.timer_windows(lambda: calls.append(1), torch.device("cpu"), warmup=4, steps=5, repeats=3)
    assert steps == 5 and len(seconds) == 3 and all(s > 0 for s in seconds)
    # the warm-up and three windows of five, plus Timer's own untimed calls before each
    assert len(calls) >= 4 + 3 * 5
    # every clock reading synchronises: at least both ends of the warm-up and of each window
    assert len(syncs) >= 2 * (1 + 3) and len(syncs) % 2 == 0 and set(syncs) == {"cpu"}


def test_model_windows_keep_the_trainers_thread_count():
    threads = torch.get_num_threads()
    seen = []
    timing.timer_windows(lambda: seen.append(torch.get_num_threads()), "cpu", warmup=0, steps=1, repeats=1)
    assert set(seen) == {threads}  # Timer's default would be one thread


def test_paired_windows_alternate_which_goes_first():
    order = []

    def window(name):
        return lambda count: order.append((name, count)) or 1.0

    own, other = timing.paired_windows(window("trainer"), window("model"), warmup=2, steps=5, repeats=4)
    assert order == [("trainer", 2), ("model", 2),
                     ("trainer", 5), ("model", 5), ("model", 5), ("trainer", 5),
                     ("trainer", 5), ("model", 5), ("model", 5), ("trainer", 5)]
    assert own == other == (5, [1.0] * 4)


def test_a_budget_adds_pairs_until_the_windows_fill_it():
    warmed = []
    own, other = timing.paired_windows(lambda count: 0.5, lambda count: 0.25, warmup=1, steps=1, repeats=3,
                                       budget_s=6.0, warmed=warmed.append)
    assert warmed == [0.75]  # a pair of warm-up steps
    assert len(own.seconds) == len(other.seconds) == 8  # 8 pairs of 0.75 s: the first to reach 6 s
    fast, _ = timing.paired_windows(lambda count: 1e-3, lambda count: 1e-3, 0, 1, 3, budget_s=6.0)
    assert len(fast.seconds) == timing.MAX_REPEATS
    slow, _ = timing.paired_windows(lambda count: 10.0, lambda count: 10.0, 0, 1, 3, budget_s=6.0)
    assert len(slow.seconds) == 3  # at least `repeats`, whatever the budget


def test_a_budget_of_model_only_windows_is_timers_blocked_autorange():
    calls = []
    steps, seconds = timing.timer_windows(lambda: calls.append(1), "cpu", warmup=0, steps=1, repeats=1,
                                          budget_s=0.05)
    # Timer chose windows of many calls (the call is cheap next to the clock) and filled the budget with them
    assert steps > 1 and sum(seconds) >= 0.05 and len(calls) >= steps * len(seconds)


@pytest.mark.parametrize("values, expected", [
    ([1.0, 2.0, 3.0, 4.0, 5.0], {"median": 3.0, "p10": 1.4, "p90": 4.6}),  # numpy.percentile, linear
    ([10.0, 20.0], {"median": 15.0, "p10": 11.0, "p90": 19.0}),
    ([7.0], {"median": 7.0, "p10": 7.0, "p90": 7.0}),
])
def test_spread_is_numpys_linear_percentiles(values, expected):
    assert timing.spread(values) == pytest.approx(expected)
