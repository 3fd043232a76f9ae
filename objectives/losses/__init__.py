"""Reusable self-supervised loss functions shared by objectives (no registrations here)."""

from objectives.losses.dino import (
    all_reduce_sum,
    dino_cross_view_loss,
    ibot_patch_loss,
    koleo_loss,
    sinkhorn_knopp,
    softmax_center,
    update_center,
)

__all__ = [
    "all_reduce_sum",
    "dino_cross_view_loss",
    "ibot_patch_loss",
    "koleo_loss",
    "sinkhorn_knopp",
    "softmax_center",
    "update_center",
]
