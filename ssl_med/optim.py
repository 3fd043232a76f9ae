"""Optimiser parameter groups, built in one place for pretraining and for the evaluators.

The encoder says which of its parameters skip weight decay (:meth:`Encoder.no_weight_decay`) and at
which depth each sits (:meth:`Encoder.layer_id`); nothing here reads parameter names itself::

    scales = layer_decay_scales(encoder, layer_decay=0.75)          # {name: 0.75 ** (depth + 1 - layer)}
    groups = param_groups(encoder, weight_decay=0.05, no_weight_decay=encoder.no_weight_decay(),
                          lr_scale=scales, lr=1e-3)
    optimizer = build_optimizer(groups, "adamw", lr=1e-3, weight_decay=0.05)

The groups follow timm's ``param_groups_layer_decay`` (same layer numbering, same ``lr_scale`` key,
same rule that biases and 1-D parameters get no weight decay), with two additions the training
module needs: any mapping of per-parameter LR multipliers (DINOv2's patch-embedding multiplier
on top of layer decay), and an ``apply_wd`` flag telling the weight-decay schedule which groups it
drives. ``build_optimizer`` is timm's optimizer factory, so ``optim.name`` may be ``adamw``,
``lamb``, ``lars``, ``sgd`` (Nesterov momentum) or any other name timm registers.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ssl_med.encoder import Encoder

ADAM_FAMILY = ("adam", "adamw", "lamb", "nadam", "nadamw", "radam", "lion")


def layer_decay_scales(encoder: Encoder, layer_decay: float, prefix: str = "") -> dict[str, float]:
    """``{prefix + name: layer_decay ** (depth + 1 - encoder.layer_id(name))}`` over the encoder's
    parameters: the stem gets ``layer_decay ** (depth + 1)``, block ``i`` ``layer_decay ** (depth - i)``,
    the final norm 1 (BEiT / MAE fine-tuning, DINOv2's layer-wise decay)."""
    depth = encoder.depth
    return {
        prefix + name: layer_decay ** (depth + 1 - encoder.layer_id(name))
        for name, _ in encoder.named_parameters()
    }


def param_groups(
    module: nn.Module,
    weight_decay: float,
    *,
    no_weight_decay: Collection[str] = (),
    lr_scale: Mapping[str, float] | None = None,
    lr: float | None = None,
) -> list[dict[str, Any]]:
    """Trainable parameters of ``module`` grouped by (weight decay on/off, LR multiplier).

    Args:
        module: the model; names are its ``named_parameters()`` keys.
        weight_decay: decay of the groups that have it.
        no_weight_decay: names trained without weight decay (besides biases and 1-D parameters).
        lr_scale: ``{name: multiplier}``; missing names get 1.
        lr: if given, each group's ``lr`` is ``lr * lr_scale`` (for optimisers without a scheduler
            that reads ``lr_scale``).

    Returns:
        groups ``{"params", "weight_decay", "lr_scale", "apply_wd"(, "lr")}``, sorted by
        (decay, multiplier); every trainable parameter is in exactly one.
    """
    scales = lr_scale or {}
    skip = set(no_weight_decay)
    grouped: dict[tuple[bool, float], list[nn.Parameter]] = {}
    for name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        decay = not (param.ndim <= 1 or name.endswith(".bias") or name in skip)
        grouped.setdefault((decay, scales.get(name, 1.0)), []).append(param)
    groups = []
    for (decay, scale), params in sorted(grouped.items(), key=lambda kv: kv[0]):
        group: dict[str, Any] = {
            "params": params,
            "weight_decay": weight_decay if decay else 0.0,
            "apply_wd": decay,
            "lr_scale": scale,
        }
        if lr is not None:
            group["lr"] = lr * scale
        groups.append(group)
    return groups


def prefixed(names: Iterable[str], prefix: str) -> set[str]:
    """``{prefix + name}``: a submodule's parameter names as its parent's ``named_parameters()`` keys."""
    return {prefix + name for name in names}


def build_optimizer(
    groups: list[dict[str, Any]],
    name: str,
    lr: float,
    weight_decay: float,
    betas: Sequence[float] = (0.9, 0.999),
    momentum: float = 0.9,
) -> torch.optim.Optimizer:
    """timm's optimizer factory over ready-made ``groups``: ``adamw`` is ``torch.optim.AdamW``,
    ``lamb`` / ``lars`` timm's LAMB / LARS, ``sgd`` ``torch.optim.SGD`` with Nesterov momentum.
    ``betas`` go to the Adam family, ``momentum`` to the others."""
    from timm.optim import create_optimizer_v2

    kwargs: dict[str, Any] = {"betas": tuple(betas)} if name.lower() in ADAM_FAMILY else {"momentum": momentum}
    return create_optimizer_v2(groups, opt=name, lr=lr, weight_decay=weight_decay, **kwargs)
