"""Choosing the linear probe's read-out and ``C`` without touching test: on val, or by cross-validation.

DINOv2's linear evaluation (Oquab et al., 2023, §7 and ``dinov2/eval/linear.py``) does not fix how
features are read out of a frozen encoder: it trains one classifier per read-out (CLS token alone, CLS
concatenated with the average-pooled patch tokens, ...) and per learning rate, and keeps the one that is
best on validation. :func:`select_readout` does the same over ``eval.features`` (a list of
:data:`~ssl_med.evaluators.features.FEATURE_MODES`) × ``eval.C``, for the pretrained encoder and its
random-init twin alike, so neither is judged by a read-out that suits only the other.

Two ways to choose (``eval.select_on``):

* ``val`` — MedMNIST's protocol: fit on train, score each candidate on val, refit nothing; the chosen
  classifier is scored on test.
* ``cv`` — stratified ``k``-fold cross-validation over train ∪ val (each fold: standardise and fit on the
  other folds, score the held-out one; candidates ranked by the mean over folds); the chosen candidate is
  refitted on all of train ∪ val and scored on test. With small validation splits (BreastMNIST's has
  78 images, 21 malignant) one val AUROC moves by ±0.05 by chance, enough to pick a read-out that is
  worse on test; ``k`` folds over 624 images average that noise down. Test is never read before the
  choice is made in either mode.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from sklearn.model_selection import KFold, StratifiedKFold
from sklearn.preprocessing import StandardScaler

from ssl_med.evaluators.metrics import classification_metrics

SELECT_ON = ("val", "cv")


@dataclass
class ReadoutChoice:
    """The chosen read-out and its scores.

    Attributes:
        features: the chosen feature mode.
        C: the chosen inverse L2 strength.
        scores: ``{mode: {str(C): selection score}}`` (val metric, or mean CV metric).
        test: test metrics of the chosen classifier.
        fit_on: the splits the scored classifier was fitted on (``train`` or ``train+val``).
    """

    features: str
    C: float
    scores: dict[str, dict[str, float]]
    test: dict[str, float]
    fit_on: str

    def as_dict(self) -> dict[str, Any]:
        return {"features": self.features, "C": self.C, "scores": self.scores, "fit_on": self.fit_on}


def folds(labels: np.ndarray, k: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """``k`` (train, held-out) index pairs over ``labels`` ``(N,)`` (stratified) or ``(N, L)`` (plain
    shuffled folds: multi-label sets have no single class to stratify on)."""
    if k < 2:
        raise ValueError(f"eval.cv_folds must be >= 2, got {k}")
    if labels.ndim == 1:
        counts = np.bincount(labels)
        missing = np.flatnonzero(counts == 0).tolist()
        if missing:  # a probe fitted without them would score misaligned class columns
            raise ValueError(
                f"class ids {missing} have no item in train + val (ids run 0..{len(counts) - 1}): the probe "
                "cannot score a class it never saw; relabel the file to consecutive ids present in train"
            )
        smallest = int(counts.min(initial=len(labels))) if len(labels) else 0
        if smallest < k:
            raise ValueError(
                f"eval.cv_folds={k} needs at least {k} items of every class in train + val; the rarest class "
                f"has {smallest}: lower eval.cv_folds or use eval.select_on=val"
            )
        splitter: Any = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    else:
        splitter = KFold(n_splits=k, shuffle=True, random_state=seed)
    return list(splitter.split(np.zeros(len(labels)), labels))


def cv_scores(
    x: np.ndarray, y: np.ndarray, task: str, c_values: list[float], metric: str, k: int, seed: int, fit: Any
) -> dict[str, float]:
    """Mean held-out ``metric`` per ``C`` over ``k`` folds of ``x`` ``(N, D)``; ``fit(x, y, c)`` returns
    a fitted classifier with ``predict_proba``."""
    per_c: dict[str, list[float]] = {str(c): [] for c in c_values}
    for train_idx, held_idx in folds(y, k, seed):
        scaler = StandardScaler().fit(x[train_idx])
        x_train, x_held = scaler.transform(x[train_idx]), scaler.transform(x[held_idx])
        for c in c_values:
            model = fit(x_train, y[train_idx], c)
            per_c[str(c)].append(classification_metrics(model.predict_proba(x_held), y[held_idx], task)[metric])
    return {c: float(np.nanmean(v)) if np.isfinite(v).any() else float("nan") for c, v in per_c.items()}


def val_scores(
    x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray, task: str,
    c_values: list[float], metric: str, fit: Any,
) -> tuple[StandardScaler, dict[float, Any], dict[str, float]]:
    """Standardise on ``x_train`` ``(N, D)``, fit one classifier per ``C``, score each on val: returns the
    scaler, ``{C: fitted classifier}`` and ``{str(C): val metric}`` (MedMNIST's choose-on-val protocol)."""
    scaler = StandardScaler().fit(x_train)
    xt, xv = scaler.transform(x_train), scaler.transform(x_val)
    models = {float(c): fit(xt, y_train, c) for c in c_values}
    scores = {str(c): classification_metrics(models[float(c)].predict_proba(xv), y_val, task)[metric] for c in c_values}
    return scaler, models, scores


def best_candidate(scores: dict[str, dict[str, float]], c_values: list[float]) -> tuple[str, float]:
    """The (mode, C) with the highest finite score; ties keep the first mode and the first C in grid
    order. With no finite score: the first mode and the middle of the grid."""
    best, best_score = None, -np.inf
    for mode, by_c in scores.items():
        for c in c_values:
            score = by_c.get(str(c), float("nan"))
            if np.isfinite(score) and score > best_score:
                best, best_score = (mode, float(c)), score
    if best is None:
        return next(iter(scores)), float(c_values[len(c_values) // 2])
    return best


@dataclass
class ValFit:
    """The (read-out, ``C``) best on val, with the scaler and classifier fitted on train for it.

    Attributes:
        mode: the chosen read-out.
        C: the chosen inverse L2 strength.
        scaler: the train standardisation of ``mode``'s features.
        model: the classifier fitted on standardised train features at ``C``.
        scores: ``{mode: {str(C): val metric}}`` of every candidate.
    """

    mode: str
    C: float
    scaler: StandardScaler
    model: Any
    scores: dict[str, dict[str, float]]


def fit_on_val(
    feats: dict[str, dict[str, np.ndarray]], labels: dict[str, np.ndarray], task: str, c_values: list[float],
    metric: str, fit: Any,
) -> ValFit:
    """Fit one classifier per read-out in ``feats`` (``{mode: {split: (N, D_mode)}}``, splits ``train`` and
    ``val``) and ``C`` in ``c_values`` on standardised train features, score each on val, keep the best
    (:func:`best_candidate`). The linear probe's ``select_on=val`` and LP-FT's starting head both choose so."""
    scores: dict[str, dict[str, float]] = {}
    fitted: dict[tuple[str, float], tuple[StandardScaler, Any]] = {}
    for mode, by_split in feats.items():
        scaler, models, scores[mode] = val_scores(
            by_split["train"], labels["train"], by_split["val"], labels["val"], task, c_values, metric, fit
        )
        fitted.update({(mode, c): (scaler, model) for c, model in models.items()})
    mode, c = best_candidate(scores, c_values)
    scaler, model = fitted[mode, c]
    return ValFit(mode, c, scaler, model, scores)


def select_readout(
    feats: dict[str, dict[str, np.ndarray]],
    labels: dict[str, np.ndarray],
    task: str,
    c_values: list[float],
    metric: str,
    fit: Any,
    select_on: str = "val",
    cv_folds: int = 5,
    seed: int = 0,
) -> ReadoutChoice:
    """Choose (read-out, C) on val or by CV and score the chosen classifier once on test.

    Args:
        feats: ``{mode: {split: (N, D_mode)}}`` for the splits ``train``, ``val``, ``test``.
        labels: ``{split: (N,) or (N, L)}``.
        task: ``binary`` | ``multi-class`` | ``multi-label``.
        c_values: the ``C`` grid.
        metric: the selection metric (a key of :func:`classification_metrics`).
        fit: ``fit(x, y, c)`` -> a fitted classifier with ``predict_proba``.
        select_on: ``val`` or ``cv`` (see the module docstring).
        cv_folds: folds for ``cv``.
        seed: fold shuffling seed.
    """
    if select_on not in SELECT_ON:
        raise ValueError(f"eval.select_on must be one of {SELECT_ON}, got {select_on!r}")
    fit_splits = ("train",) if select_on == "val" else ("train", "val")
    if select_on == "val":
        best = fit_on_val(feats, labels, task, c_values, metric, fit)
        mode, c, scaler, model, scores = best.mode, best.C, best.scaler, best.model, best.scores
    else:  # cv: score every candidate over folds of train + val, refit the chosen one on all of it
        y_fit = np.concatenate([labels[s] for s in fit_splits])
        x_fit = {m: np.concatenate([by_split[s] for s in fit_splits]) for m, by_split in feats.items()}
        scores = {m: cv_scores(x, y_fit, task, c_values, metric, cv_folds, seed, fit) for m, x in x_fit.items()}
        mode, c = best_candidate(scores, c_values)
        scaler = StandardScaler().fit(x_fit[mode])
        model = fit(scaler.transform(x_fit[mode]), y_fit, c)
    test = classification_metrics(model.predict_proba(scaler.transform(feats[mode]["test"])), labels["test"], task)
    return ReadoutChoice(mode, c, scores, test, "+".join(fit_splits))
