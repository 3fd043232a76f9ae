"""Weighted kNN (``eval=knn``): DINO's cosine kNN with temperature-weighted votes on cached features.

Features are L2-normalised; each test item takes its ``k`` most cosine-similar training items,
which vote for their class with weight ``exp(sim / T)``. Accuracy and balanced accuracy are
standard; ``auroc_votes`` (AUROC of the normalised vote distribution) is reported but is not a
standard kNN metric (kNN gives no calibrated scores).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ssl_med.encoder import Encoder
from ssl_med.evaluators.base import EvalContext, EvalResult
from ssl_med.evaluators.channels import evaluate_channels
from ssl_med.evaluators.datasets import ClassificationData
from ssl_med.evaluators.features import cached_features
from ssl_med.evaluators.metrics import classification_metrics
from ssl_med.registry import EVALUATORS


def knn_scores(
    train: np.ndarray,
    train_labels: np.ndarray,
    query: np.ndarray,
    num_classes: int,
    k: int = 20,
    temperature: float = 0.07,
    chunk: int = 1024,
) -> np.ndarray:
    """Vote distribution ``(Q, K)`` (rows sum to 1) for ``query`` ``(Q, D)`` against ``train`` ``(N, D)``.

    ``train_labels`` ``(N,)`` ints, or ``(N, L)`` {0, 1} for multi-label (then each label's score is
    its weighted vote share, ``(Q, L)``).
    """
    bank = F.normalize(torch.from_numpy(train).double(), dim=1)
    y = torch.from_numpy(train_labels).long()
    onehot = y.double() if y.ndim == 2 else F.one_hot(y, num_classes).double()  # (N, K)
    k = min(k, len(bank))
    out = []
    for start in range(0, len(query), chunk):
        q = F.normalize(torch.from_numpy(query[start : start + chunk]).double(), dim=1)
        sim, idx = (q @ bank.T).topk(k, dim=1)  # (Q, k)
        weights = (sim / temperature).exp()
        votes = (weights.unsqueeze(-1) * onehot[idx]).sum(dim=1)  # (Q, K)
        out.append(votes / weights.sum(dim=1, keepdim=True))
    return torch.cat(out).numpy()


@EVALUATORS.register("knn")
def knn(encoder: Encoder, cfg: dict[str, Any], data: ClassificationData, ctx: EvalContext) -> EvalResult:
    """kNN of test features against the training features (``cfg``: ``k``, ``temperature``, ``features``;
    ``channels`` / ``channel_subsets``: :func:`~ssl_med.evaluators.channels.evaluate_channels`)."""
    if not isinstance(data, ClassificationData):
        raise TypeError("knn needs a classification dataset (eval_data=breastmnist, vesselmnist3d, ...)")
    return evaluate_channels(_knn, encoder, cfg, data, ctx)


def _knn(encoder: Encoder, cfg: dict[str, Any], data: ClassificationData, ctx: EvalContext) -> EvalResult:
    """One kNN evaluation of ``encoder`` on ``data`` (see :func:`knn`)."""
    feats = cached_features(
        encoder, data.images, ctx.dataset_key, cfg["features"], ctx.cache_dir, cfg["batch_size"], ctx.device
    )
    k, t = int(cfg["k"]), float(cfg["temperature"])
    scores = knn_scores(feats["train"], data.labels["train"], feats["test"], data.num_classes, k, t)
    metrics = classification_metrics(scores, data.labels["test"], data.task)
    metrics["auroc_votes"] = metrics.pop("auroc")  # non-standard: AUROC of the vote shares
    return EvalResult(metrics=metrics, details={"k": k, "temperature": t})
