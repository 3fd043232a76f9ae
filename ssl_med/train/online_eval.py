"""Online evaluation: is the representation getting better while it trains?

Every ``every_n_steps`` (and before the first step, which is the random-init reference, and after
the last), :class:`OnlineEval` embeds a small labelled set with the current encoder — the EMA
teacher where the objective has one (:meth:`~ssl_med.objective.Objective.eval_encoder`) — and logs

* ``online/knn_accuracy``, ``online/knn_auroc``: weighted cosine kNN (DINO's protocol,
  :func:`ssl_med.evaluators.knn.knn_scores`) of the **val** split against the train split;
* ``online/linear_auroc``, ``online/linear_accuracy``: a closed-form ridge classifier on
  standardised features (one SVD, no iterations), trained on train and scored on val; its L2 strength
  is chosen per evaluation from ``online_eval.ridge`` (or a decade beyond its ends, with a warning) by the
  exact leave-one-out AUROC on **train** (``online/linear_ridge``), so a random network and a trained one
  are each read at the strength that suits their features (a fixed strong ridge reads a random ViT well
  below what a tuned probe gets from it, and the curve then overstates what pretraining added);
* ``online/embedding_std``, ``online/effective_rank``: the spread and the RankMe effective rank of the
  val embeddings (:mod:`ssl_med.train.collapse`, the collapse monitor on fixed images).

With ``online_eval.student=true`` an objective with an EMA teacher has its student read too, as
``online/student_<metric>`` for the quality metrics (solo-learn's ``momentum_classifier`` the other way
round): on short runs the better of the two to export differs between data sets.

The curve is also written to ``<run dir>/online_eval.json`` (``ssl_med report`` lists the last
value of each run next to its step-0 value). Checkpoints keep the curve, so a resumed run continues it, and
``encoder_best/`` is then replaced only by an encoder that beats the one it holds. The test split is never read. Images are loaded once (the ``eval_data`` groups of ``ssl_med
evaluate``, resized to the pretraining geometry), features are extracted in ``eval()`` mode under
``torch.no_grad`` on the training device, so the cost is one forward pass over
``max_train + max_val`` images per evaluation and nothing enters the training graph.
"""

from __future__ import annotations

import functools
import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch

from ssl_med.config import OnlineEvalConfig
from ssl_med.evaluators.datasets import ClassificationData, _subset
from ssl_med.evaluators.features import extract_features
from ssl_med.evaluators.knn import knn_scores
from ssl_med.evaluators.metrics import classification_metrics
from ssl_med.train.collapse import effective_rank, embedding_std

log = logging.getLogger(__name__)


def standardise(train: np.ndarray, *others: np.ndarray) -> list[torch.Tensor]:
    """``train`` ``(N, D)`` and each of ``others`` ``(Q, D)`` centred and scaled by the train mean and std
    (float64; a feature without spread is scaled by 1e-6, i.e. left at zero)."""
    x = torch.from_numpy(np.asarray(train)).double()
    mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
    return [(torch.from_numpy(np.asarray(a)).double() - mean) / std for a in (train, *others)]


def _standardised_design(train: np.ndarray, query: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """``train`` ``(N, D)`` and ``query`` ``(Q, D)`` standardised with the train statistics, with a bias
    column: ``(N, D + 1)``, ``(Q, D + 1)`` float64."""
    x, q = standardise(train, query)
    return torch.cat([x, x.new_ones(len(x), 1)], 1), torch.cat([q, q.new_ones(len(q), 1)], 1)


def ridge_probe_scores(
    train: np.ndarray,
    train_labels: np.ndarray,
    query: np.ndarray,
    num_classes: int,
    ridge: float | Sequence[float],
    task: str = "multi-class",
) -> tuple[np.ndarray, float]:
    """Class scores ``(Q, K)`` of a ridge classifier (one-hot targets) fitted in closed form, and its ridge.

    Features ``(N, D)`` are standardised with the train statistics; ``W = (XᵀX + λ N I)⁻¹ XᵀY``. With several
    ``ridge`` values, ``λ`` is the one whose leave-one-out predictions on the train split score the highest
    AUROC (``task`` as :func:`~ssl_med.evaluators.metrics.classification_metrics`; ties go to the larger
    ``λ``). Where that is an end of the grid, the decade beyond it is scored too and taken if it scores higher:
    a chosen end is then confirmed by leave-one-out, and a strength outside the grid means the grid cut the
    search short (:class:`OnlineEval` warns). Leave-one-out is exact and needs no refits: with ``X = U S Vᵀ``
    the hat matrix is ``H = U diag(s² / (s² + λN)) Uᵀ`` and the prediction for row ``i`` without it is
    ``(ŷᵢ − Hᵢᵢ yᵢ) / (1 − Hᵢᵢ)`` (Allen's PRESS identity; the standardisation statistics include row ``i``).
    Single-label scores are a softmax of the predictions, so AUROC and argmax accuracy apply. Multi-label
    ``train_labels`` ``(N, L)`` {0, 1} are regressed per label, centred on their train prevalence ``p`` (so a
    strong ridge shrinks ``ŷ`` toward ``p``, not toward 0), and each label's score is ``sigmoid(10 (ŷ − 0.5))``:
    monotone in ``ŷ`` (AUROC unchanged) and above 0.5 exactly where the regression is, so the metrics' 0.5
    threshold reads the regression's own decision.
    """
    x1, q1 = _standardised_design(train, query)
    labels = torch.from_numpy(np.asarray(train_labels)).long()
    multi_label = task == "multi-label"
    if multi_label != (labels.ndim == 2):
        raise ValueError(f"ridge probe: task {task!r} with labels of shape {tuple(labels.shape)}")
    if multi_label:
        prevalence = labels.double().mean(0)
        y = labels.double() - prevalence
    else:
        y = torch.nn.functional.one_hot(labels, num_classes).double()

    def to_scores(pred: torch.Tensor) -> torch.Tensor:
        if multi_label:
            return torch.sigmoid((pred + prevalence - 0.5) * 10.0)
        return torch.softmax(pred * 10.0, dim=1)

    u, sv, vh = torch.linalg.svd(x1, full_matrices=False)
    uty = u.T @ y
    lambdas = [float(ridge)] if isinstance(ridge, (int, float)) else sorted((float(r) for r in ridge), reverse=True)

    def loo_auroc(lam: float) -> float:
        shrink = sv**2 / (sv**2 + lam * len(x1))
        fitted = u @ (shrink[:, None] * uty)
        leverage = (u**2 @ shrink).clamp_max(1 - 1e-9)[:, None]
        loo = (fitted - leverage * y) / (1 - leverage)
        return classification_metrics(to_scores(loo).numpy(), train_labels, task)["auroc"]

    score = functools.cache(loo_auroc)  # an end of the grid is scored again beside the decade beyond it
    lam = max(lambdas, key=score) if len(lambdas) > 1 else lambdas[0]  # max keeps the first: the larger on ties
    if len(lambdas) > 1 and lam in (lambdas[0], lambdas[-1]):
        beyond = lam * 10.0 if lam == lambdas[0] else lam / 10.0
        lam = beyond if score(beyond) > score(lam) else lam
    w = vh.T @ ((sv / (sv**2 + lam * len(x1)))[:, None] * uty)
    return to_scores(q1 @ w).numpy(), lam


def online_metrics(
    train: np.ndarray, train_labels: np.ndarray, val: np.ndarray, val_labels: np.ndarray, task: str, num_classes: int, cfg: OnlineEvalConfig
) -> dict[str, float]:
    """kNN and ridge-probe metrics of ``val`` ``(Q, D)`` against ``train`` ``(N, D)``; labels ``(N,)`` ints, or
    ``(N, L)`` {0, 1} for ``task="multi-label"`` (AUROC and accuracy then the means over labels)."""
    knn = classification_metrics(knn_scores(train, train_labels, val, num_classes, cfg.k, cfg.temperature), val_labels, task)
    scores, ridge = ridge_probe_scores(train, train_labels, val, num_classes, cfg.ridge, task)
    lin = classification_metrics(scores, val_labels, task)
    return {
        "knn_accuracy": knn["accuracy"],
        "knn_auroc": knn["auroc"],
        "linear_accuracy": lin["accuracy"],
        "linear_auroc": lin["auroc"],
        "linear_ridge": ridge,
        "embedding_std": float(embedding_std(torch.from_numpy(val))),
        "effective_rank": effective_rank(torch.from_numpy(val)),
    }


#: the label-quality metrics :func:`online_metrics` returns (higher is better; ``online_eval.keep_best`` picks one)
QUALITY_METRICS = ("knn_accuracy", "knn_auroc", "linear_accuracy", "linear_auroc")
#: every metric :func:`online_metrics` returns (``online/<name>`` in TensorBoard): the quality metrics, the
#: ridge strength the probe chose, and two collapse diagnostics that are not "better" when larger
METRICS = (*QUALITY_METRICS, "linear_ridge", "embedding_std", "effective_rank")


class OnlineEval(L.Callback):
    """Logs ``online/*`` metrics of the current encoder on a labelled train/val set (see module docstring).

    Args:
        cfg: the ``online_eval`` settings.
        data: the labelled set (its ``train`` and ``val`` splits are used, ``test`` is dropped); its
            ``name`` (a file of one's own: the file's) names it in the log and the curve file.
    """

    def __init__(
        self,
        cfg: OnlineEvalConfig,
        data: ClassificationData,
        out_file: Path | None = None,
        best_dir: Path | None = None,
        export_config: dict[str, Any] | None = None,
    ) -> None:
        self.cfg = cfg
        self.name = data.name
        self.task, self.num_classes = data.task, data.num_classes
        self.images: dict[str, torch.Tensor] = {}
        self.labels: dict[str, np.ndarray] = {}
        for split, limit in (("train", cfg.max_train), ("val", cfg.max_val)):
            keep = _subset(len(data.labels[split]), limit, data.labels[split])
            self.images[split] = data.images[split][torch.from_numpy(keep)]
            self.labels[split] = data.labels[split][keep]
        self.out_file = out_file
        self.best_dir, self.export_config = best_dir, export_config or {}
        self.best: dict[str, float] | None = None
        self.history: list[dict[str, float]] = []
        self.seconds = 0.0
        self._last_step = -1
        self._beyond_warned = False

    @torch.no_grad()
    def evaluate(self, pl_module: L.LightningModule, encoder: torch.nn.Module | None = None) -> dict[str, float]:
        """Metrics of ``encoder`` (default ``pl_module.objective.eval_encoder()``) now (its mode is restored);
        ``features: auto`` is the objective's :attr:`~ssl_med.objective.Objective.eval_features`."""
        objective = pl_module.objective
        encoder = objective.eval_encoder() if encoder is None else encoder
        device = str(pl_module.device)
        mode = objective.eval_features if self.cfg.features == "auto" else self.cfg.features
        feats = {
            split: extract_features(encoder, x, mode, self.cfg.batch_size, device)
            for split, x in self.images.items()
        }
        return online_metrics(
            feats["train"], self.labels["train"], feats["val"], self.labels["val"], self.task, self.num_classes, self.cfg
        )

    def student_metrics(self, pl_module: L.LightningModule) -> dict[str, float]:
        """``{"student_<metric>": value}`` of the student's quality metrics with ``cfg.student`` where the
        objective evaluates an EMA teacher; empty otherwise."""
        objective = pl_module.objective
        if not self.cfg.student or objective.eval_weights() == "student":
            return {}
        metrics = self.evaluate(pl_module, objective.encoder)
        return {f"student_{name}": metrics[name] for name in QUALITY_METRICS}

    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if step == self._last_step or not trainer.is_global_zero:
            return
        self._last_step = step
        start = time.perf_counter()
        metrics = self.evaluate(pl_module)
        metrics.update(self.student_metrics(pl_module))
        self.seconds += time.perf_counter() - start
        self.history.append({"step": step, **metrics})
        self._keep_if_best(step, metrics, pl_module)
        experiment = getattr(trainer.logger, "experiment", None)
        if experiment is not None and hasattr(experiment, "add_scalar"):
            for name, value in metrics.items():
                experiment.add_scalar(f"online/{name}", value, step)
            experiment.add_scalar("online/seconds", self.seconds, step)
        log.info(
            "online eval (%s val, step %d): kNN acc %.3f AUROC %.3f | ridge probe AUROC %.3f (ridge %g) | "
            "embedding std %.4f, effective rank %.1f",
            self.name, step, metrics["knn_accuracy"], metrics["knn_auroc"], metrics["linear_auroc"], metrics["linear_ridge"],
            metrics["embedding_std"], metrics["effective_rank"],
        )
        if "student_linear_auroc" in metrics:
            log.info(
                "online eval (%s val, step %d), the student: kNN acc %.3f AUROC %.3f | ridge probe AUROC %.3f",
                self.name, step, metrics["student_knn_accuracy"], metrics["student_knn_auroc"], metrics["student_linear_auroc"],
            )
        self._warn_beyond_grid(step, metrics["linear_ridge"])

    def _warn_beyond_grid(self, step: int, ridge: float) -> None:
        """Warn once per run when the ridge probe chose a strength a decade beyond ``online_eval.ridge`` (see
        :func:`ridge_probe_scores`): its best may lie further out, so ``online/linear_auroc`` may understate the
        encoder. A strength at an end of the grid is not warned about: the decade beyond it scored lower."""
        grid = [float(r) for r in self.cfg.ridge]
        if self._beyond_warned or len(grid) < 2 or min(grid) <= ridge <= max(grid):
            return
        self._beyond_warned = True
        log.warning(
            "online eval (step %d): the ridge probe chose %g, a decade beyond the %s strength of online_eval.ridge "
            "(leave-one-out on train scored it higher); its best may lie further out, so online/linear_auroc may "
            "understate this encoder (extend online_eval.ridge)",
            step, ridge, "smallest" if ridge < min(grid) else "largest",
        )

    def _keep_if_best(self, step: int, metrics: dict[str, float], pl_module: L.LightningModule) -> None:
        """Export the evaluated encoder to ``best_dir`` when ``cfg.keep_best`` improved (val only); where the
        student was read too (``cfg.student``), the better of teacher and student is the candidate."""
        key = self.cfg.keep_best
        if not key or self.best_dir is None or step == 0:  # step 0 is the random init, not a result
            return
        objective = pl_module.objective
        weights, encoder, value = objective.eval_weights(), objective.eval_encoder(), metrics[key]
        if metrics.get(f"student_{key}", -np.inf) > value:
            weights, encoder, value = "student", objective.encoder, metrics[f"student_{key}"]
        if self.best is not None and not value > self.best["value"]:
            return
        from ssl_med.export import save_encoder

        self.best = {"step": step, "weights": weights, "value": value, **metrics}
        save_encoder(encoder, self.best_dir, {
            **self.export_config, "exported_weights": weights, "selected_on": {"val": key, **self.best},
        })
        which = f", the {weights}" if f"student_{key}" in metrics else ""  # teacher or student, where both were read
        log.info("online eval: best val %s so far (%.3f at step %d%s): encoder written to %s", key, value, step, which, self.best_dir)

    def state_dict(self) -> dict[str, Any]:
        """The curve so far and the seconds spent: Lightning keeps them in every checkpoint, so a resumed run
        continues its curve instead of starting a new one (the best is read back from ``best_dir``)."""
        return {"history": self.history, "seconds": self.seconds}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = list(state_dict.get("history", []))
        self.seconds = float(state_dict.get("seconds", 0.0))
        self._last_step = int(self.history[-1]["step"]) if self.history else -1  # evaluated before the save

    def _resume(self, step: int) -> None:
        """Make :attr:`best` the record of the encoder ``best_dir`` holds when a run resumes at ``step``: a run
        killed after exporting a new best and before its next checkpoint resumes from a step before that
        export, so the file on disk, not the checkpoint, says which encoder a later evaluation must beat."""
        from ssl_med.weights import CONFIG_NAME, ExportError, read_config

        self.best = None
        if self.best_dir is None or not (self.best_dir / CONFIG_NAME).is_file():
            return
        try:
            record = dict(read_config(self.best_dir).get("selected_on") or {})
        except ExportError as err:
            log.warning("online eval: %s; the next better evaluation replaces it", err)
            return
        record.pop("val", None)
        if "value" not in record or "step" not in record:  # an export that names no selection
            return
        self.best = record
        if record["step"] > step:
            log.info(
                "online eval: %s holds the step-%d encoder of the interrupted attempt (val %s %.3f); the repeated "
                "steps replace it only where they score higher", self.best_dir, record["step"], self.cfg.keep_best,
                record["value"],
            )  # fmt: skip

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        step = trainer.global_step
        if step > 0:
            self._resume(step)
        if step == 0 or (self.cfg.every_n_steps > 0 and step % self.cfg.every_n_steps == 0):
            self._run(trainer, pl_module)  # step 0 of a fresh run: the random-init reference

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.cfg.every_n_steps > 0 and trainer.global_step % self.cfg.every_n_steps == 0:
            self._run(trainer, pl_module)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._run(trainer, pl_module)
        if self.out_file is not None and trainer.is_global_zero:
            record = {"data": self.name, "features": self.cfg.features, "seconds": self.seconds,
                      "best": self.best, "history": self.history}
            self.out_file.write_text(json.dumps(record, indent=1))


def build_online_eval(
    cfg: OnlineEvalConfig,
    image_size: list[int],
    in_chans: int | None,
    out_file: Path | None = None,
    best_dir: Path | None = None,
    export_config: dict[str, Any] | None = None,
) -> OnlineEval | None:
    """The callback for ``cfg`` (``None`` when ``cfg.data`` is null), with images resized to the
    pretraining geometry ``image_size`` (the encoder's input size); the curve is also written to
    ``out_file`` (JSON, read by ``ssl_med report``) at the end of training, and with ``cfg.keep_best``
    the encoder of the best val evaluation is exported to ``best_dir`` (with ``export_config``)."""
    if not cfg.data:
        return None
    if cfg.keep_best and cfg.keep_best not in QUALITY_METRICS:
        raise ValueError(
            f"online_eval.keep_best={cfg.keep_best!r}: choose a label-quality metric, one of "
            f"{', '.join(QUALITY_METRICS)}, or null"
        )
    from ssl_med.evaluators.datasets import eval_data_config, load_eval_data, resolve_eval_data

    overrides = [f"eval_data.path={cfg.path}"] if cfg.path else []
    data_cfg = resolve_eval_data(eval_data_config(cfg.data, overrides))
    if int(data_cfg.get("spatial_dims", len(image_size))) != len(image_size):
        raise ValueError(
            f"online_eval.data={cfg.data} is {data_cfg['spatial_dims']}D but the encoder is {len(image_size)}D; "
            "choose a labelled set of the pretraining's dimension"
        )
    if len(set(image_size)) != 1:
        raise ValueError(f"online_eval needs a cubic/square encoder input, got {image_size}")
    data_cfg["image_size"] = int(image_size[0])
    data = load_eval_data(data_cfg, in_chans or 1)
    if not isinstance(data, ClassificationData):
        raise ValueError(f"online_eval.data={cfg.data} is not a classification set (kNN needs class labels)")
    return OnlineEval(cfg, data, out_file, best_dir, export_config)
