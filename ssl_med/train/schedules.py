"""Per-step schedules (plain functions of the step, as DINOv2's ``CosineScheduler``), for the
optimiser (learning rate, weight decay) and for the objectives (EMA momentum, teacher temperature)."""

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


def steps_of(value: float, total_steps: int) -> int:
    """A schedule length given as steps (``value >= 1``) or as a fraction of the run (``0 <= value < 1``).

    ``steps_of(20, 300) == 20``, ``steps_of(0.1, 300) == 30``: warm-ups written as fractions keep
    their share of a run of any length.
    """
    if value < 0:
        raise ValueError(f"schedule length {value} must be >= 0 (steps, or a fraction of the run below 1)")
    return round(value * total_steps) if value < 1 else int(value)


def cosine_schedule(step: int, total: int, start: float, end: float) -> float:
    """Half-cosine from ``start`` (step 0) to ``end`` (step ``total``), constant afterwards."""
    if total <= 0:
        return end
    t = min(max(step, 0), total) / total
    return end + 0.5 * (start - end) * (1.0 + math.cos(math.pi * t))


def linear_warmup(step: int, warmup: int, start: float, end: float) -> float:
    """``np.linspace(start, end, warmup)[step]`` during warm-up, then ``end`` (DINOv2's teacher-temp schedule)."""
    if step >= warmup:
        return end
    return start + (end - start) * step / max(warmup - 1, 1)
