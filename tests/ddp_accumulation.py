"""Launched by test_distributed.py on 2 processes: one trainer steps on batches of 32 per process, another on 2
micro-batches of 16 with DDP's gradient sync on the second only. After 3 steps (80 images per process: 32, 32
and 16; the last accumulated step has one micro-batch) their weights must agree to float rounding (SGD is
linear in the gradient): within 1e-4 of how far the weights moved (measured 4.5e-5: the convolutions' backward
sums a batch of 16 in another order than one of 32, and gloo's all-reduce adds its own; a wrong weighting of
the micro-batches would be off by about as much as the weights moved)."""

import sys
from contextlib import ExitStack
from pathlib import Path

from toolkit.config import TrainConfig
from toolkit.train import training_run

data_dir, out = sys.argv[1], Path(sys.argv[2])
common = {"image_size": 65, "train_samples": 160, "eval_samples": 50, "device": "cpu", "precision": "no",
          "dropout": 0.0, "shift_px": 0.0, "ema_decay": 0.0, "optimizer": "sgd", "lr": 0.01, "warmup_steps": 2,
          "data_dir": data_dir, "download": False, "cpu_threads": 1}
with ExitStack() as runs:
    one = runs.enter_context(training_run(TrainConfig(**common, batch_size=32, output_dir=str(out / "one")),
                                          quiet=True))
    accumulated = runs.enter_context(training_run(TrainConfig(**common, batch_size=16, grad_accum_steps=2,
                                                              output_dir=str(out / "acc")), quiet=True))
    initial = {k: v.clone() for k, v in one.net.network.state_dict().items()}
    one.train_steps(3)
    accumulated.train_steps(3)
    expected, got = one.net.network.state_dict(), accumulated.net.network.state_dict()
    difference = max(float((got[k] - expected[k]).abs().max()) for k in expected)
    moved = max(float((expected[k] - initial[k]).abs().max()) for k in expected)
    if one.accelerator.is_main_process:
        print(f"accumulated vs large batch on {one.world_size} processes: max difference {difference:.2e}, "
              f"weights moved up to {moved:.2e}")
    assert accumulated.progress.batch == 5 and one.progress.batch == 3
    assert difference < 1e-4 * moved and moved > 0.1, (difference, moved)
