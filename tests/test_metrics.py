"""Exact evaluation metrics, and the first K misclassified examples: those one process would find, in order,
for any number of processes, at no cost when not asked for."""

from __future__ import annotations

import sys

import pytest
import torch
from accelerate import Accelerator
from conftest import ROOT, accelerate_state, run

from toolkit import metrics
from toolkit.data import EvalBatches, Preprocess


@pytest.fixture
def accelerator():
    """An Accelerator in the test process, with a fresh Accelerate state around the test."""
    with accelerate_state():
        yield Accelerator(cpu=True)


class ReadsItsAnswer(torch.nn.Module):
    """Logits (B, 10) that pick the digit written in each image's first pixel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 28, 28) in [0, 1]
        return torch.nn.functional.one_hot((x[:, 0, 0, 0] * 255).round().long(), 10).float()


def known_answers(count: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images whose first pixel holds the model's answer, labels, answers): every 7th answer wrong."""
    labels = torch.arange(count) % 10
    answers = labels.clone()
    answers[3::7] = (labels[3::7] + 1) % 10
    images = torch.zeros(count, 28, 28, dtype=torch.uint8)
    images[:, 0, 0] = answers.to(torch.uint8)
    return images, labels, answers


@pytest.mark.parametrize("keep", [1, 4, 50])
def test_the_first_misclassified_are_kept_in_order(accelerator, keep):
    images, labels, answers = known_answers(100)
    batches = EvalBatches(images, labels, 16, Preprocess(28, normalize=False))
    result = metrics.evaluate(ReadsItsAnswer(), batches, accelerator, expected_count=100, keep_misclassified=keep)
    expected = (answers != labels).nonzero().squeeze(1)[:keep]  # 14 wrong: 3, 10, 17, ...
    assert result.misclassified.index.tolist() == expected.tolist()
    assert result.misclassified.true.tolist() == labels[expected].tolist()
    assert result.misclassified.predicted.tolist() == answers[expected].tolist()
    assert result.count - result.correct == 14


def test_nothing_is_kept_or_gathered_by_default(accelerator, monkeypatch):
    monkeypatch.setattr(metrics, "first_misclassified", lambda *a: pytest.fail("called with K = 0"))
    images, labels, _ = known_answers(40)
    result = metrics.evaluate(ReadsItsAnswer(), EvalBatches(images, labels, 16, Preprocess(28, normalize=False)),
                              accelerator, expected_count=40)
    assert len(result.misclassified) == 0 and result.misclassified.index.dtype == torch.int64
    assert result.correct == 40 - 6


@pytest.mark.slow
def test_three_processes_keep_exactly_the_first_misclassified_in_order():
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(ROOT / "launch" / "cpu_ddp.yaml"), "--num_processes", "3"]
    result = run([*launch, str(ROOT / "tests" / "ddp_misclassified.py"), "1001"], timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "keep 5: 3 processes, first [5, 300, 700, 709, 718]" in result.stdout
    assert "keep 1000: 3 processes" in result.stdout


class Fixed(torch.nn.Module):
    """Logits that are a fixed function of the input, so the expected answer can be computed directly."""

    def forward(self, x):
        return x.flatten(1)[:, :10] * 3.0


def test_sums_equal_a_direct_computation(accelerator):
    torch.manual_seed(0)
    images = torch.randn(23, 1, 4, 4)
    labels = torch.randint(0, 10, (23,))
    batches = [(images[i:i + 5], labels[i:i + 5]) for i in range(0, 23, 5)]  # the last batch is short
    result = metrics.evaluate(Fixed(), batches, accelerator, expected_count=23)
    logits = Fixed()(images)
    assert result.count == 23
    assert result.correct == int((logits.argmax(1) == labels).sum())
    assert result.loss == pytest.approx(float(torch.nn.functional.cross_entropy(logits, labels)), rel=1e-6)
    assert int(result.confusion.sum()) == 23 and result.confusion[labels[0], logits[0].argmax()] >= 1
    assert result.accuracy == result.correct / 23


def test_a_count_that_is_not_the_expected_one_stops(accelerator):
    batches = [(torch.randn(4, 1, 4, 4), torch.zeros(4, dtype=torch.long))]
    with pytest.raises(metrics.EvalCountError, match="evaluated 4 samples across 1 processes, expected exactly 5"):
        metrics.evaluate(Fixed(), batches, accelerator, expected_count=5)


# Tensor methods that make the host wait for the device when called on a CUDA or MPS tensor.
HOST_SYNCS = ("item", "cpu", "tolist", "numpy", "nonzero", "__bool__", "__int__", "__float__", "__index__")


@pytest.fixture
def host_syncs(monkeypatch):
    """The calls an evaluation makes that would wait for the device, counted on the CPU. torch.bincount fails:
    it reads its input's largest value to size its output, a sync inside C++ that no count here would see."""
    calls: list[str] = []
    monkeypatch.setattr(torch, "bincount", lambda *a, **k: pytest.fail("torch.bincount waits for the device"))
    for name in HOST_SYNCS:
        monkeypatch.setattr(torch.Tensor, name, _counted(getattr(torch.Tensor, name), name, calls))
    return calls


def _counted(method, name: str, calls: list[str]):
    def counted(self, *args, **kwargs):
        calls.append(name)
        return method(self, *args, **kwargs)

    return counted


@pytest.mark.parametrize("keep", [0, 5])
def test_evaluation_waits_for_the_device_a_fixed_few_times_whatever_the_batches(accelerator, host_syncs, keep):
    images, labels, _ = known_answers(70)
    counts = {}
    for batch_size in (70, 10):  # 1 batch, then 7
        host_syncs.clear()
        batches = EvalBatches(images, labels, batch_size, Preprocess(28, normalize=False))
        result = metrics.evaluate(ReadsItsAnswer(), batches, accelerator, expected_count=70, keep_misclassified=keep)
        counts[batch_size] = len(host_syncs)
        assert result.correct == 60
    assert counts[70] == counts[10] <= 8, host_syncs  # none in the loop: a few after it, reading the sums
