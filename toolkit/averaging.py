"""An exponential moving average of the weights: the weights evaluated, saved for use and exported.

At a learning rate high enough to train fast, the weights at any one step are noisy; their running average is
a better model, most of all early in a run while the learning rate is still at its peak.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

# Averaging is a pass over all 46.8M weights: every few steps (with the decay compounded to match) is as good
# and that many times cheaper.
UPDATE_EVERY_STEPS = 4


class WeightAverage:
    def __init__(self, model: nn.Module, decay_per_step: float) -> None:
        self.module = copy.deepcopy(model).eval().requires_grad_(False)
        self.decay = decay_per_step ** UPDATE_EVERY_STEPS
        self.updates = 0

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        """Fold in `model`'s weights after optimizer step `step` (1-based), every UPDATE_EVERY_STEPS steps."""
        if step % UPDATE_EVERY_STEPS:
            return
        self.updates += 1
        # warm-up: early on the average forgets fast, so the first (random) weights do not linger in it
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(list(self.module.parameters()), [p.detach() for p in model.parameters()], 1 - decay)
