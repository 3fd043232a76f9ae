"""Linear probe (``eval=linear_probe``): logistic regression on cached frozen features.

Protocol (ecosystem notes §2.1/§2.7): features standardised on the training split; L-BFGS
logistic regression (one-vs-rest for multi-label) for each ``C`` in ``cfg['C']``; the ``C`` with the
best validation ``select_metric`` is scored once on test. Label efficiency: the same sweep on
stratified, seeded ``label_fractions`` of the training labels, mean ± std over ``seeds``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from sklearn.preprocessing import StandardScaler

from ssl_med.encoder import Encoder
from ssl_med.evaluators.base import EvalContext, EvalResult
from ssl_med.evaluators.datasets import ClassificationData
from ssl_med.evaluators.features import cached_features
from ssl_med.evaluators.label_efficiency import stratified_subset
from ssl_med.evaluators.metrics import classification_metrics
from ssl_med.registry import EVALUATORS


def fit_logistic(x: np.ndarray, y: np.ndarray, c: float, task: str, max_iter: int = 2000) -> Any:
    """Fit an L-BFGS logistic regression on ``x`` ``(N, D)``; one-vs-rest per label for multi-label."""
    model = LogisticRegression(C=c, max_iter=max_iter)
    if task == "multi-label":
        model = OneVsRestClassifier(model)
    return model.fit(x, y)


def predict_scores(model: Any, x: np.ndarray) -> np.ndarray:
    """``(N, K)`` class probabilities (``(N, L)`` per-label probabilities for multi-label)."""
    return model.predict_proba(x)


def probe_sweep(
    feats: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    task: str,
    c_values: list[float],
    select_metric: str = "auroc",
    train_idx: np.ndarray | None = None,
) -> dict[str, Any]:
    """Sweep ``C`` on ``feats['train'][train_idx]``, choose on val, score the chosen model on test.

    Returns ``{"C": best C, "val": {C: val metric}, "test": test metrics}``.
    """
    idx = np.arange(len(labels["train"])) if train_idx is None else train_idx
    scaler = StandardScaler().fit(feats["train"][idx])
    x = {s: scaler.transform(f) for s, f in feats.items()}
    y_train = labels["train"][idx]
    best, best_score, val_scores = None, -np.inf, {}
    for c in c_values:
        model = fit_logistic(x["train"][idx], y_train, c, task)
        val = classification_metrics(predict_scores(model, x["val"]), labels["val"], task)
        score = val[select_metric]
        val_scores[str(c)] = score
        if np.isfinite(score) and score > best_score:
            best, best_score = (c, model), score
    if best is None:  # every val score NaN (e.g. a one-class val subset): fall back to the middle C
        c = c_values[len(c_values) // 2]
        best = (c, fit_logistic(x["train"][idx], y_train, c, task))
    test = classification_metrics(predict_scores(best[1], x["test"]), labels["test"], task)
    return {"C": best[0], "val": val_scores, "test": test}


def label_efficiency(
    feats: dict[str, np.ndarray],
    data: ClassificationData,
    cfg: dict[str, Any],
    seed: int,
) -> dict[str, dict[str, list[float]]]:
    """``{fraction: {metric: [mean, std, n]}}`` of test metrics over seeds (one draw at 100%)."""
    out: dict[str, dict[str, list[float]]] = {}
    train_y = data.labels["train"]
    for fraction in cfg["label_fractions"]:
        seeds = [seed] if float(fraction) >= 1 else [seed + s for s in cfg["seeds"]]
        runs = []
        for s in seeds:
            idx = stratified_subset(train_y, float(fraction), seed=s)
            runs.append(
                probe_sweep(feats, data.labels, data.task, cfg["C"], cfg["select_metric"], idx)["test"]
            )
        out[str(fraction)] = {
            k: [float(np.nanmean([r[k] for r in runs])), float(np.nanstd([r[k] for r in runs])), len(runs)]
            for k in ("accuracy", "balanced_accuracy", "auroc")
            if k in runs[0]
        }
    return out


@EVALUATORS.register("linear_probe")
def linear_probe(
    encoder: Encoder, cfg: dict[str, Any], data: ClassificationData, ctx: EvalContext
) -> EvalResult:
    """Linear probe on ``cfg['features']`` features; headline = 100% labels, plus the label-efficiency curve."""
    if not isinstance(data, ClassificationData):
        raise TypeError(
            "linear_probe needs a classification dataset (eval_data=breastmnist, vesselmnist3d, ...)"
        )
    feats = cached_features(
        encoder, data.images, ctx.dataset_key, cfg["features"], ctx.cache_dir, cfg["batch_size"], ctx.device
    )
    full = probe_sweep(feats, data.labels, data.task, cfg["C"], cfg["select_metric"])
    details: dict[str, Any] = {
        "C": full["C"],
        "val_sweep": full["val"],
        "feature_dim": int(feats["train"].shape[1]),
    }
    if cfg.get("label_fractions"):
        details["label_efficiency"] = label_efficiency(feats, data, cfg, ctx.seed)
    return EvalResult(metrics=full["test"], details=details)
