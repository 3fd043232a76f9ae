"""Seeded stratified subsets of the training labels (label-efficiency curves)."""

from __future__ import annotations

import numpy as np


def stratified_subset(labels: np.ndarray, fraction: float, seed: int = 0) -> np.ndarray:
    """Sorted indices of a stratified random ``fraction`` of ``labels`` ``(N,)`` (or ``(N, L)``).

    Every class keeps ``max(1, round(fraction * n_class))`` items, so even 1% of a small set has each
    class. Multi-label ``(N, L)`` labels are stratified on their label combination.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction}")
    keys = labels if labels.ndim == 1 else np.unique(labels, axis=0, return_inverse=True)[1].reshape(-1)
    if fraction == 1:
        return np.arange(len(keys))
    rng = np.random.default_rng(seed)
    picked = []
    for cls in np.unique(keys):
        members = np.flatnonzero(keys == cls)
        take = max(1, round(fraction * len(members)))
        picked.append(rng.choice(members, size=take, replace=False))
    return np.sort(np.concatenate(picked))
