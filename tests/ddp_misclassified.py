"""Launched by test_metrics.py through `accelerate launch`: every process evaluates its slice of a set whose
wrong answers are known, and the main process checks the first K misclassified against the whole set's.

Each image carries the answer the model will give in its first pixel; the wrong ones are placed so that the
first slice has two, the second none and the third many: the first K must cross slices in order."""

import sys

import torch
from accelerate import Accelerator

from toolkit.data import EvalBatches, Preprocess
from toolkit.metrics import evaluate


class ReadsItsAnswer(torch.nn.Module):
    """Logits (B, 10) that pick the digit written in each image's first pixel."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, 1, 28, 28) in [0, 1]
        return torch.nn.functional.one_hot((x[:, 0, 0, 0] * 255).round().long(), 10).float()


count = int(sys.argv[1])
accelerator = Accelerator(cpu=True)
labels = torch.arange(count) % 10
answers = labels.clone()
answers[[5, 300]] = (labels[[5, 300]] + 1) % 10  # the first slice (0-332 of 1001 in three): two wrong
answers[700::9] = (labels[700::9] + 3) % 10  # the third slice: many wrong
images = torch.zeros(count, 28, 28, dtype=torch.uint8)
images[:, 0, 0] = answers.to(torch.uint8)
batches = EvalBatches(images, labels, 16, Preprocess(28, normalize=False), accelerator.process_index,
                      accelerator.num_processes)
expected = (answers != labels).nonzero().squeeze(1)
for keep in (1, 3, 5, 1000):
    result = evaluate(ReadsItsAnswer(), batches, accelerator, expected_count=count, keep_misclassified=keep)
    if accelerator.is_main_process:
        wrong = result.misclassified
        assert wrong.index.tolist() == expected[:keep].tolist(), (keep, wrong.index.tolist())
        assert wrong.true.tolist() == labels[wrong.index].tolist()
        assert wrong.predicted.tolist() == answers[wrong.index].tolist()
        assert result.count - result.correct == len(expected)
        print(f"keep {keep}: {accelerator.num_processes} processes, first {wrong.index.tolist()[:6]}")
accelerator.wait_for_everyone()
accelerator.end_training()  # destroys the process group: a live gloo group at exit can abort
