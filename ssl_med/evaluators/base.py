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

from ssl_med.encoder import Encoder
from ssl_med.optim import layer_decay_scales, param_groups


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
    encoder: Encoder, lr: float, layer_decay: float, weight_decay: float = 0.05
) -> list[dict[str, Any]]:
    """AdamW parameter groups with layer-wise LR decay (BEiT/MAE fine-tuning recipe).

    Block ``i`` of ``depth`` gets ``lr * layer_decay ** (depth - i)``; the stem (patch embedding,
    prefix/position/mask tokens) ``lr * layer_decay ** (depth + 1)``; the final norm ``lr``, as the
    encoder's :meth:`~ssl_med.encoder.Encoder.layer_id` numbers them. Biases, 1-D parameters and the
    encoder's :meth:`~ssl_med.encoder.Encoder.no_weight_decay` get no weight decay.
    """
    return param_groups(
        encoder,
        weight_decay,
        no_weight_decay=encoder.no_weight_decay(),
        lr_scale=layer_decay_scales(encoder, layer_decay),
        lr=lr,
    )
