"""Per-step schedules (plain functions of the step, as DINOv2's ``CosineScheduler``)."""

from __future__ import annotations

import math


def warmup_cosine(step: int, total_steps: int, start: float, end: float, warmup_steps: int = 0) -> float:
    """Linear warmup from 0 to ``start`` over ``warmup_steps``, then half-cosine from ``start`` to ``end``.

    ``step`` counts from 0; steps past ``total_steps`` stay at ``end``.
    """
    if step < warmup_steps:
        return start * (step + 1) / warmup_steps
    span = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * progress))
