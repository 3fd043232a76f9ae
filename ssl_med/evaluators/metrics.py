"""Classification metrics with MedMNIST's evaluator semantics, and Dice via MONAI.

``scores`` are ``(N, K)`` class probabilities (single-label) or ``(N, L)`` per-label probabilities
(multi-label); ``labels`` ``(N,)`` ints or ``(N, L)`` {0, 1}.

* binary: AUROC of the positive-class score (column 1), ACC of argmax (= 0.5 threshold).
* multi-class: AUROC = mean one-vs-rest AUROC over classes, ACC of argmax.
* multi-label: per-label AUROC and its mean; ACC = mean per-label accuracy at 0.5; plus mean AUPRC.
* balanced accuracy (mean per-class recall) for single-label tasks.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.metrics import average_precision_score, balanced_accuracy_score, roc_auc_score


def _safe_auc(y: np.ndarray, s: np.ndarray) -> float:
    return float(roc_auc_score(y, s)) if 0 < y.sum() < len(y) else float("nan")


def classification_metrics(scores: np.ndarray, labels: np.ndarray, task: str) -> dict[str, float]:
    """``accuracy``, ``balanced_accuracy``, ``auroc`` (+ ``auroc/<i>``, ``auprc`` for multi-label)."""
    scores = np.asarray(scores, dtype=np.float64)
    if task == "multi-label":
        per_label = [_safe_auc(labels[:, i], scores[:, i]) for i in range(labels.shape[1])]
        out = {f"auroc/{i}": v for i, v in enumerate(per_label)}
        out["auroc"] = float(np.nanmean(per_label))
        out["accuracy"] = float(((scores > 0.5) == labels.astype(bool)).mean())
        out["auprc"] = float(
            np.nanmean(
                [
                    average_precision_score(labels[:, i], scores[:, i])
                    for i in range(labels.shape[1])
                    if labels[:, i].any()
                ]
            )
        )
        return out
    pred = scores.argmax(axis=1)
    out = {
        "accuracy": float((pred == labels).mean()),
        "balanced_accuracy": float(balanced_accuracy_score(labels, pred)),
    }
    if task == "binary":
        out["auroc"] = _safe_auc(labels, scores[:, 1])
    else:
        out["auroc"] = float(
            np.nanmean([_safe_auc(labels == k, scores[:, k]) for k in range(scores.shape[1])])
        )
    return out


def dice_per_class(pred: torch.Tensor, label: torch.Tensor, num_classes: int) -> np.ndarray:
    """Foreground Dice per class ``(num_classes - 1,)`` of integer maps ``pred``/``label`` ``(B, *S)``.

    MONAI ``DiceMetric(include_background=False)`` on one-hot maps, aggregated over the batch
    (``mean_batch``); a class absent from both prediction and truth in every item scores NaN.
    """
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot

    metric = DiceMetric(include_background=False, reduction="mean_batch", ignore_empty=True)
    metric(one_hot(pred[:, None].long(), num_classes), one_hot(label[:, None].long(), num_classes))
    return metric.aggregate().cpu().numpy().astype(np.float64)
