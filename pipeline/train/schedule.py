"""The learning rate of each step: linear warmup, then cosine decay to a floor (TinyLlama's).

A pure function of the step, so a resumed run needs no scheduler state.
"""

from __future__ import annotations

import math


def learning_rate(step: int, lr: float, min_lr: float, warmup: int, decay: int) -> float:
    """lr for optimizer step `step` (0-based): lr * (step + 1) / warmup during warmup, then cosine
    from lr to min_lr until step `decay`, min_lr after."""
    if step < warmup:
        return lr * (step + 1) / warmup
    if step >= decay:
        return min_lr
    progress = (step - warmup) / max(1, decay - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (lr - min_lr)
