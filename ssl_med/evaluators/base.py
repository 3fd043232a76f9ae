"""What every evaluator receives (:class:`EvalContext`) and returns (:class:`EvalResult`).

An evaluator is a function registered in :data:`ssl_med.registry.EVALUATORS`::

    @EVALUATORS.register("knn")
    def knn(encoder: Encoder, cfg: dict, data: ClassificationData, ctx: EvalContext) -> EvalResult: ...

``cfg`` is the ``eval`` config group as a plain dict; ``data`` comes from
:func:`ssl_med.evaluators.datasets.load_eval_data`. :func:`ssl_med.evaluators.api.evaluate` calls it
once per encoder (pretrained, random-init baseline) and writes the results.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn


@dataclass
class EvalContext:
    """Run-wide settings for one evaluator call.

    Attributes:
        out_dir: folder for this encoder's artefacts (plots, overlays).
        encoder_label: row name, e.g. ``pretrained`` or ``random-init``.
        dataset_key: identifies the evaluation images (feature-cache key).
        device: torch device string.
        cache_dir: feature cache folder, or ``None`` to disable caching.
        seed: base random seed.
    """

    out_dir: Path
    encoder_label: str
    dataset_key: str
    device: str = "cpu"
    cache_dir: Path | None = None
    seed: int = 0


@dataclass
class EvalResult:
    """Headline test metrics (one table row) plus anything else worth saving.

    Attributes:
        metrics: flat ``{name: value}`` test metrics, e.g. ``{"auroc": 0.81, "accuracy": 0.77}``.
        details: JSON-serialisable extras (sweeps, curves, per-class values, settings).
    """

    metrics: dict[str, float]
    details: dict[str, Any] = field(default_factory=dict)


def layer_decay_groups(
    encoder: nn.Module, lr: float, layer_decay: float, weight_decay: float = 0.05
) -> list[dict[str, Any]]:
    """AdamW parameter groups with layer-wise LR decay (BEiT/MAE fine-tuning recipe).

    Block ``i`` of ``depth`` gets ``lr * layer_decay ** (depth - i)``; the patch embedding and
    prefix/position/mask tokens ``lr * layer_decay ** (depth + 1)``; the final norm and anything
    else ``lr``. Biases, norms and tokens get no weight decay.
    """
    depth = int(getattr(encoder, "depth", 0))
    no_decay_names = encoder.no_weight_decay() if hasattr(encoder, "no_weight_decay") else set()
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in encoder.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith("blocks."):
            layer = int(name.split(".")[1]) + 1
        elif name.startswith(("patch_embed", "cls_token", "reg_token", "pos_embed", "mask_token")):
            layer = 0
        else:
            layer = depth + 1
        no_decay = param.ndim <= 1 or name.split(".")[0] in no_decay_names
        key = (layer, no_decay)
        if key not in groups:
            scale = layer_decay ** (depth + 1 - layer)
            groups[key] = {"params": [], "lr": lr * scale, "weight_decay": 0.0 if no_decay else weight_decay}
        groups[key]["params"].append(param)
    return list(groups.values())
