"""Exact classification metrics across processes.

Each process evaluates its own contiguous slice of the evaluation set (no padding, no duplicates; the slices
in rank order cover the set in order) and keeps sums: per-sample loss, a 10x10 confusion matrix and the sample
count. The sums are added across processes, so the count of correct answers equals a single-process evaluation
of the same weights for any number of processes and any test-set size; the total count is checked against the
test-set size. On request it also keeps the first K misclassified examples, exactly those one process would.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from accelerate import Accelerator

from toolkit import devices
from toolkit.model import NUM_CLASSES


@dataclass(frozen=True)
class Misclassified:
    """The first misclassified examples of an evaluation set, in its order; int64 (M,) each, on the CPU."""

    index: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))  # in the evaluation set
    true: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))
    predicted: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))

    def __len__(self) -> int:
        return len(self.index)


@dataclass(frozen=True)
class EvalResult:
    loss: float  # mean cross-entropy per sample
    correct: int
    count: int
    confusion: torch.Tensor  # (true class, predicted class) counts, int64 (10, 10), on the CPU
    misclassified: Misclassified = field(default_factory=Misclassified)  # the first K, when asked for

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
             accelerator: Accelerator, expected_count: int, keep_misclassified: int = 0,
             on_batch: Callable[[], None] | None = None) -> EvalResult:
    """Evaluate `model` (not DDP-wrapped: no collectives inside) on this process's batches and add the sums
    of all processes. Raises EvalCountError if the processes together saw other than `expected_count`.

    `keep_misclassified` K > 0 also returns the first K misclassified examples of the whole set (`misclassified`):
    each process keeps its batches' predictions on the device (8 bytes an image, no host sync in the loop), picks
    the first K wrong ones of its slice after the loop, and the picks are gathered in rank order, which is the
    set's order. K = 0 adds nothing to the loop. `on_batch` is called after each batch is queued (a progress
    bar: it reads nothing from the device)."""
    was_training = model.training
    model.eval()
    device = accelerator.device
    loss_sum = torch.zeros((), dtype=devices.widest_float(device), device=device)
    confusion = torch.zeros(NUM_CLASSES * NUM_CLASSES, dtype=torch.int64, device=device)
    cells = torch.arange(NUM_CLASSES * NUM_CLASSES, device=device)  # (100,) the confusion matrix, flattened
    predictions: list[torch.Tensor] = []  # with K > 0: (B,) per batch, and the labels beside them
    seen_labels: list[torch.Tensor] = []
    with accelerator.autocast():
        for images, labels in batches:
            logits = model(images).float()
            predicted = logits.argmax(dim=1)  # (B,)
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").to(loss_sum.dtype)
            # each answer's cell, counted against every cell: (B, 100) -> (100,). A fixed-size sum never waits for
            # the host; torch.bincount reads the largest value to size its output (a host sync per batch on CUDA,
            # two on MPS).
            confusion += ((labels * NUM_CLASSES + predicted)[:, None] == cells).sum(dim=0)
            if keep_misclassified:
                predictions.append(predicted)
                seen_labels.append(labels)
            if on_batch:
                on_batch()
    model.train(was_training)
    # counts are integers, so they add exactly across processes
    loss_sum = accelerator.reduce(loss_sum, reduction="sum")
    confusion = accelerator.reduce(confusion, reduction="sum").view(NUM_CLASSES, NUM_CLASSES).cpu()
    count = int(confusion.sum())
    if count != expected_count:
        raise EvalCountError(f"evaluated {count} samples across {accelerator.num_processes} processes, "
                             f"expected exactly {expected_count}")
    misclassified = first_misclassified(predictions, seen_labels, keep_misclassified, accelerator) \
        if keep_misclassified else Misclassified()
    return EvalResult(loss=float(loss_sum) / count, correct=int(confusion.trace()), count=count,
                      confusion=confusion, misclassified=misclassified)


def first_misclassified(predictions: list[torch.Tensor], labels: list[torch.Tensor], keep: int,
                        accelerator: Accelerator) -> Misclassified:
    """The first `keep` misclassified examples of the whole set, from each process's predictions and labels of
    its own contiguous slice, in order. Every process calls it (two gathers)."""
    device = accelerator.device
    empty = torch.empty(0, dtype=torch.int64, device=device)
    predicted = torch.cat(predictions) if predictions else empty  # (n,) this slice
    true = torch.cat(labels) if labels else empty
    wrong = (predicted != true).nonzero().squeeze(1)[:keep]  # positions in this slice; one host sync
    # where this slice starts in the set: the sizes of the slices before it
    sizes = accelerator.gather(torch.tensor([len(true)], dtype=torch.int64, device=device)).cpu()
    start = int(sizes[:accelerator.process_index].sum())
    rows = torch.full((keep, 3), -1, dtype=torch.int64, device=device)  # (index, true, predicted); -1: none
    rows[:len(wrong), 0] = wrong + start
    rows[:len(wrong), 1] = true[wrong]
    rows[:len(wrong), 2] = predicted[wrong]
    gathered = accelerator.gather(rows).cpu()  # (processes * keep, 3), in rank order: the set's order
    kept = gathered[gathered[:, 0] >= 0][:keep]
    return Misclassified(index=kept[:, 0].clone(), true=kept[:, 1].clone(), predicted=kept[:, 2].clone())
