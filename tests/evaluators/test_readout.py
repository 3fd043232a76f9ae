"""Read-out and C selection of the linear probe (ssl_med/evaluators/readout.py): on val or by CV,
never looking at test; CV scores checked against scikit-learn's own cross-validation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ssl_med.evaluators import linear_probe as probe_module
from ssl_med.evaluators.api import match_encoder
from ssl_med.evaluators.base import EvalContext
from ssl_med.evaluators.datasets import ClassificationData
from ssl_med.evaluators.readout import best_candidate, cv_scores, folds, select_readout

C = [1e-3, 1e-1, 10.0]


def fit(x: np.ndarray, y: np.ndarray, c: float) -> LogisticRegression:
    return LogisticRegression(C=c, max_iter=1000).fit(x, y)


def two_readouts(n: int = 60, seed: int = 0) -> tuple[dict, dict]:
    """``informative``: one feature carries the label (plus noise); ``noise``: pure noise ``(N, 4)``."""
    rng = np.random.default_rng(seed)
    labels = {s: np.arange(n) % 2 for s in ("train", "val", "test")}
    feats = {
        "informative": {s: np.c_[y + 0.3 * rng.normal(size=n), rng.normal(size=(n, 3))] for s, y in labels.items()},
        "noise": {s: rng.normal(size=(n, 4)) for s in labels},
    }
    return feats, labels


@pytest.mark.parametrize("select_on", ["val", "cv"])
def test_picks_the_informative_readout(select_on: str) -> None:
    feats, labels = two_readouts()
    choice = select_readout(feats, labels, "binary", C, "auroc", fit, select_on, cv_folds=3)
    assert choice.features == "informative"
    assert choice.test["auroc"] > 0.95
    assert choice.fit_on == ("train" if select_on == "val" else "train+val")
    assert set(choice.scores) == {"informative", "noise"} and set(choice.scores["noise"]) == {str(c) for c in C}


@pytest.mark.parametrize("select_on", ["val", "cv"])
def test_choice_never_reads_test(select_on: str) -> None:
    feats, labels = two_readouts()
    first = select_readout(feats, labels, "binary", C, "auroc", fit, select_on, cv_folds=3)
    # flip the test labels: the choice must not move
    flipped = {**labels, "test": 1 - labels["test"]}
    second = select_readout(feats, flipped, "binary", C, "auroc", fit, select_on, cv_folds=3)
    assert (first.features, first.C, first.scores) == (second.features, second.C, second.scores)
    assert second.test["auroc"] == pytest.approx(1 - first.test["auroc"])  # test was read, after the choice


def test_cv_scores_match_scikit_learn() -> None:
    rng = np.random.default_rng(1)
    y = np.arange(80) % 2
    x = np.c_[y + rng.normal(size=80), rng.normal(size=(80, 5))]
    ours = cv_scores(x, y, "binary", C, "auroc", 4, 3, fit)
    for c in C:
        ref = cross_val_score(
            make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000)),
            x,
            y,
            cv=StratifiedKFold(4, shuffle=True, random_state=3),
            scoring="roc_auc",
        )
        assert ours[str(c)] == pytest.approx(ref.mean(), abs=1e-9)


def test_folds_name_the_rare_class_problem() -> None:
    labels = np.array([0] * 20 + [1] * 2)
    with pytest.raises(ValueError, match=r"cv_folds=5.*rarest class has 2"):
        folds(labels, 5, 0)
    gap = np.array([0] * 10 + [2] * 10)  # class 1 absent from train + val: named, not "the rarest class has 0"
    with pytest.raises(ValueError, match=r"class ids \[1\] have no item in train \+ val"):
        folds(gap, 5, 0)
    multi = np.random.default_rng(0).integers(0, 2, size=(20, 3))
    assert len(folds(multi, 4, 0)) == 4  # multi-label: plain shuffled folds


def test_best_candidate_ties_and_nan() -> None:
    scores = {"a": {"0.1": 0.8, "1.0": 0.9}, "b": {"0.1": 0.9, "1.0": 0.5}}
    assert best_candidate(scores, [0.1, 1.0]) == ("a", 1.0)  # first mode wins the tie
    assert best_candidate({"a": {"0.1": float("nan"), "1.0": float("nan")}}, [0.1, 1.0, 10.0]) == ("a", 1.0)


def test_bad_select_on() -> None:
    feats, labels = two_readouts()
    with pytest.raises(ValueError, match="select_on"):
        select_readout(feats, labels, "binary", C, "auroc", fit, "test")


def test_linear_probe_reports_its_readout(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    feats, labels = two_readouts()
    modes = {"mean_patch": feats["informative"], "pooled": feats["noise"]}
    monkeypatch.setattr(probe_module, "cached_readouts", lambda enc, images, key, names, *a, **k: {m: modes[m] for m in names})
    images = {s: torch.zeros(len(y), 1, 8, 8) for s, y in labels.items()}
    data = ClassificationData("toy", "binary", images, labels, 2)
    cfg = {"features": ["pooled", "mean_patch"], "C": C, "select_metric": "auroc", "select_on": "cv",
           "cv_folds": 3, "label_fractions": [], "seeds": [0], "batch_size": 8}
    result = probe_module.linear_probe(None, cfg, data, EvalContext(tmp_path, "pretrained", "toy"))  # type: ignore[arg-type]
    assert result.details["features"] == "mean_patch"
    assert result.details["readout"]["fit_on"] == "train+val"
    with pytest.raises(ValueError, match=r"unknown read-out.*cls_token"):
        probe_module.linear_probe(None, {**cfg, "features": ["cls_token"]}, data, EvalContext(tmp_path, "p", "toy"))  # type: ignore[arg-type]


def test_match_encoder_resolves_auto_in_a_list() -> None:
    mae = {"objective": {"name": "mae"}, "backbone": {}}
    eval_cfg, _ = match_encoder({"features": ["auto", "pooled", "mean_patch"]}, {}, mae)
    assert eval_cfg["features"] == ["mean_patch", "pooled"]
    eval_cfg, _ = match_encoder({"features": "auto"}, {}, {"objective": {"name": "dino"}})
    assert eval_cfg["features"] == "pooled"
