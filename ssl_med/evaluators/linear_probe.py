"""Linear probe (``eval=linear_probe``): logistic regression on cached frozen features.

Protocol (DINOv2's and MedMNIST's linear evaluation): features standardised on the training split; L-BFGS
logistic regression (one-vs-rest for multi-label) for each read-out in ``cfg['features']`` (one mode or a
list, as DINOv2 sweeps its read-outs) and each ``C`` in ``cfg['C']``; the candidate with the best
``select_metric`` on val (``select_on: val``) or in ``cv_folds``-fold cross-validation over train ∪ val
(``select_on: cv``, :mod:`ssl_med.evaluators.readout`) is scored once on test. Label efficiency: the
read-out and ``C`` chosen on val for each stratified, seeded subset (``label_fractions`` of the
training labels), fitted on the subset alone, mean ± std over ``seeds``.

Two diagnostics are reported once per probe run (one log line each, also kept in ``details``):
a chosen ``C`` at the smallest or largest grid value (the optimum may lie outside the grid), and the
number of fits that stopped at ``max_iter`` (collected instead of one ``ConvergenceWarning`` per fit).
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.multiclass import OneVsRestClassifier
from sklearn.preprocessing import StandardScaler

from ssl_med.encoder import Encoder
from ssl_med.evaluators.base import EvalContext, EvalResult
from ssl_med.evaluators.channels import evaluate_channels
from ssl_med.evaluators.datasets import ClassificationData
from ssl_med.evaluators.features import FEATURE_MODES, cached_readouts
from ssl_med.evaluators.label_efficiency import stratified_subset
from ssl_med.evaluators.metrics import classification_metrics
from ssl_med.evaluators.readout import select_readout
from ssl_med.registry import EVALUATORS

log = logging.getLogger(__name__)


@dataclass
class FitLog:
    """The L-BFGS budget of a probe run and a tally of the fits that ran out of it.

    Attributes:
        max_iter: L-BFGS iteration limit of every fit.
        fits: fits made so far.
        not_converged: C value -> fits at that C that stopped at ``max_iter`` without converging.
    """

    max_iter: int = 2000
    fits: int = 0
    not_converged: dict[float, int] = field(default_factory=dict)

    def record(self, c: float, converged: bool) -> None:
        self.fits += 1
        if not converged:
            self.not_converged[c] = self.not_converged.get(c, 0) + 1

    def summary(self) -> str | None:
        """One line on the fits that did not converge, or ``None`` when all did."""
        failed = sum(self.not_converged.values())
        if not failed:
            return None
        cs = ", ".join(f"{c:g}" for c in sorted(self.not_converged))
        return (
            f"{failed} of {self.fits} L-BFGS fits did not converge within max_iter={self.max_iter} "
            f"(C = {cs}); their scores use the last iterate (raise eval.max_iter to fit them fully)"
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "fits": self.fits,
            "not_converged": sum(self.not_converged.values()),
            "max_iter": self.max_iter,
        }


def fit_logistic(
    x: np.ndarray, y: np.ndarray, c: float, task: str, max_iter: int = 2000, fit_log: FitLog | None = None
) -> Any:
    """Fit an L-BFGS logistic regression on ``x`` ``(N, D)``; one-vs-rest per label for multi-label.

    With ``fit_log`` the fit's ``ConvergenceWarning``s are not emitted but tallied in it (any other
    warning passes through).
    """
    model = LogisticRegression(C=c, max_iter=max_iter)
    if task == "multi-label":
        model = OneVsRestClassifier(model)
    if fit_log is None:
        return model.fit(x, y)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, y)
    converged = True
    for w in caught:
        if issubclass(w.category, ConvergenceWarning):
            converged = False
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    fit_log.record(c, converged)
    return model


def predict_scores(model: Any, x: np.ndarray) -> np.ndarray:
    """``(N, K)`` class probabilities (``(N, L)`` per-label probabilities for multi-label)."""
    return model.predict_proba(x)


def grid_edge(c: float, c_values: list[float]) -> str | None:
    """``"smallest"``/``"largest"`` when ``c`` is the grid's smallest/largest value, else ``None``
    (also for a one-value grid, where there is nothing to choose)."""
    values = [float(v) for v in c_values]
    if len(set(values)) < 2:
        return None
    if float(c) == min(values):
        return "smallest"
    if float(c) == max(values):
        return "largest"
    return None


def probe_sweep(
    feats: dict[str, np.ndarray],
    labels: dict[str, np.ndarray],
    task: str,
    c_values: list[float],
    select_metric: str = "auroc",
    train_idx: np.ndarray | None = None,
    fit_log: FitLog | None = None,
) -> dict[str, Any]:
    """Sweep ``C`` on ``feats['train'][train_idx]`` (``(N, D)`` per split), choose on val, score on test.

    Convergence is tallied in ``fit_log`` (its ``max_iter`` is the fits' limit); without one the
    sweep keeps its own and logs its summary line.

    Returns ``{"C": best C, "val": {C: val metric}, "test": test metrics}``.
    """
    own_log = fit_log is None
    fit_log = FitLog() if fit_log is None else fit_log
    idx = np.arange(len(labels["train"])) if train_idx is None else train_idx
    scaler = StandardScaler().fit(feats["train"][idx])
    x = {s: scaler.transform(f) for s, f in feats.items()}
    y_train = labels["train"][idx]
    best, best_score, val_scores = None, -np.inf, {}
    for c in c_values:
        model = fit_logistic(x["train"][idx], y_train, c, task, fit_log.max_iter, fit_log)
        val = classification_metrics(predict_scores(model, x["val"]), labels["val"], task)
        score = val[select_metric]
        val_scores[str(c)] = score
        if np.isfinite(score) and score > best_score:
            best, best_score = (c, model), score
    if best is None:  # every val score NaN (e.g. a one-class val subset): fall back to the middle C
        c = c_values[len(c_values) // 2]
        best = (c, fit_logistic(x["train"][idx], y_train, c, task, fit_log.max_iter, fit_log))
    test = classification_metrics(predict_scores(best[1], x["test"]), labels["test"], task)
    if own_log and fit_log.summary():
        log.warning(fit_log.summary())
    return {"C": best[0], "val": val_scores, "test": test}


def label_efficiency(
    feats: dict[str, dict[str, np.ndarray]],
    data: ClassificationData,
    cfg: dict[str, Any],
    seed: int,
    fit_log: FitLog | None = None,
) -> tuple[dict[str, dict[str, list[float]]], dict[str, list[str]]]:
    """The label-efficiency curve: for each fraction of ``cfg['label_fractions']`` and each seeded
    stratified subset of the training labels (``cfg['seeds']`` offsets of ``seed``; one draw at 100 %),
    the read-out of ``feats`` (``{mode: {split: (N, D)}}``) and ``C`` with the best val
    ``select_metric``, fitted on the subset alone and scored once on test.

    The read-out is chosen per subset, on val, like ``C``: the full-label choice (cross-validated over
    every training label) would carry information a 1 % subset does not have, and the read-out a
    network is best read by can change with the number of labels.

    Returns ``({fraction: {metric: [mean, std, n]}}, {fraction: [read-out chosen per draw]})``.
    """
    curve: dict[str, dict[str, list[float]]] = {}
    chosen: dict[str, list[str]] = {}
    fit_log = FitLog(max_iter=int(cfg.get("max_iter", 2000))) if fit_log is None else fit_log
    train_y = data.labels["train"]
    for fraction in cfg["label_fractions"]:
        seeds = [seed] if float(fraction) >= 1 else [seed + s for s in cfg["seeds"]]
        runs, modes = [], []
        for s in seeds:
            idx = stratified_subset(train_y, float(fraction), seed=s)
            choice = select_readout(
                {mode: {**x, "train": x["train"][idx]} for mode, x in feats.items()},
                {**data.labels, "train": train_y[idx]},
                data.task,
                cfg["C"],
                cfg["select_metric"],
                lambda x, y, c: fit_logistic(x, y, c, data.task, fit_log.max_iter, fit_log),
                select_on="val",
            )
            runs.append(choice.test)
            modes.append(choice.features)
        curve[str(fraction)] = {
            k: [float(np.nanmean([r[k] for r in runs])), float(np.nanstd([r[k] for r in runs])), len(runs)]
            for k in ("accuracy", "balanced_accuracy", "auroc")
            if k in runs[0]
        }
        chosen[str(fraction)] = modes
    return curve, chosen


@EVALUATORS.register("linear_probe")
def linear_probe(
    encoder: Encoder, cfg: dict[str, Any], data: ClassificationData, ctx: EvalContext
) -> EvalResult:
    """Linear probe on ``cfg['features']`` features; headline = 100% labels, plus the label-efficiency curve.

    ``eval.channels`` / ``eval.channel_subsets``: on a subset of the named channels, one row per subset
    (:func:`~ssl_med.evaluators.channels.evaluate_channels`)."""
    if not isinstance(data, ClassificationData):
        raise TypeError(
            "linear_probe needs a classification dataset (eval_data=breastmnist, vesselmnist3d, ...)"
        )
    modes = [cfg["features"]] if isinstance(cfg["features"], str) else list(cfg["features"])
    unknown = [m for m in modes if m not in FEATURE_MODES]
    if unknown or not modes:
        raise ValueError(f"eval.features: unknown read-out(s) {unknown or modes}; choose from {FEATURE_MODES}")
    return evaluate_channels(_probe, encoder, cfg, data, ctx, row_details=("features", "C"))


def _probe(encoder: Encoder, cfg: dict[str, Any], data: ClassificationData, ctx: EvalContext) -> EvalResult:
    """One linear probe of ``encoder`` on ``data`` (see :func:`linear_probe`)."""
    modes = [cfg["features"]] if isinstance(cfg["features"], str) else list(cfg["features"])
    feats = cached_readouts(encoder, data.images, ctx.dataset_key, modes, ctx.cache_dir, cfg["batch_size"], ctx.device)
    fit_log = FitLog(max_iter=int(cfg.get("max_iter", 2000)))
    choice = select_readout(
        feats,
        data.labels,
        data.task,
        cfg["C"],
        cfg["select_metric"],
        lambda x, y, c: fit_logistic(x, y, c, data.task, fit_log.max_iter, fit_log),
        cfg.get("select_on", "val"),
        int(cfg.get("cv_folds", 5)),
        ctx.seed,
    )
    full = {"C": choice.C, "val": choice.scores[choice.features], "test": choice.test}
    details: dict[str, Any] = {
        "C": full["C"],
        "val_sweep": full["val"],
        "features": choice.features,
        "readout": choice.as_dict(),
        "feature_dim": int(feats[choice.features]["train"].shape[1]),
    }
    edge = grid_edge(full["C"], cfg["C"])
    if edge is not None:
        details["C_at_grid_edge"] = (
            f"chosen C={full['C']:g} is the {edge} value of the grid eval.C; the val optimum may lie "
            f"{'below' if edge == 'smallest' else 'above'} it: extend eval.C"
        )
        log.warning("linear_probe [%s]: %s", ctx.encoder_label, details["C_at_grid_edge"])
    if cfg.get("label_fractions"):
        details["label_efficiency"], details["label_efficiency_features"] = label_efficiency(
            feats, data, cfg, ctx.seed, fit_log
        )
    details["convergence"] = fit_log.as_dict()
    if fit_log.summary():
        log.warning("linear_probe [%s]: %s", ctx.encoder_label, fit_log.summary())
    return EvalResult(metrics=full["test"], details=details)
