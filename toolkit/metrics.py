"""Exact classification metrics across processes.

Each process evaluates its own contiguous slice of the test set (no padding, no duplicates) and keeps sums:
per-sample loss, a 10x10 confusion matrix and the sample count. The sums are added across processes, so the
count of correct answers equals a single-process evaluation of the same weights for any number of processes
and any test-set size; the total count is checked against the test-set size.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from toolkit import devices
from toolkit.model import NUM_CLASSES


@dataclass(frozen=True)
class EvalResult:
    loss: float  # mean cross-entropy per sample
    correct: int
    count: int
    confusion: torch.Tensor  # (true class, predicted class) counts, int64 (10, 10), on the CPU

    @property
    def accuracy(self) -> float:
        return self.correct / self.count

    def per_class_accuracy(self) -> list[float]:
        totals = self.confusion.sum(dim=1).clamp(min=1)
        return (self.confusion.diagonal() / totals).tolist()


class EvalCountError(RuntimeError):
    pass


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
             accelerator: Accelerator, expected_count: int) -> EvalResult:
    """Evaluate `model` (not DDP-wrapped: no collectives inside) on this process's batches and add the sums
    of all processes. Raises EvalCountError if the processes together saw other than `expected_count`."""
    was_training = model.training
    model.eval()
    device = accelerator.device
    loss_sum = torch.zeros((), dtype=devices.widest_float(device), device=device)
    confusion = torch.zeros(NUM_CLASSES * NUM_CLASSES, dtype=torch.int64, device=device)
    with accelerator.autocast():
        for images, labels in batches:
            logits = model(images).float()
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").to(loss_sum.dtype)
            confusion += torch.bincount(labels * NUM_CLASSES + logits.argmax(dim=1),
                                        minlength=NUM_CLASSES * NUM_CLASSES)
    model.train(was_training)
    # counts are integers, so they add exactly across processes
    loss_sum = accelerator.reduce(loss_sum, reduction="sum")
    confusion = accelerator.reduce(confusion, reduction="sum").view(NUM_CLASSES, NUM_CLASSES).cpu()
    count = int(confusion.sum())
    if count != expected_count:
        raise EvalCountError(f"evaluated {count} samples across {accelerator.num_processes} processes, "
                             f"expected exactly {expected_count}")
    return EvalResult(loss=float(loss_sum) / count, correct=int(confusion.trace()), count=count,
                      confusion=confusion)
