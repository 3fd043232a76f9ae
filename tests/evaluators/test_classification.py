"""Linear probe, kNN, metrics and features against independent computations on real BreastMNIST."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, balanced_accuracy_score, roc_auc_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ssl_med.evaluators import features as features_module
from ssl_med.evaluators.datasets import ClassificationData, load_eval_data
from ssl_med.evaluators.features import (
    cached_features,
    cached_readouts,
    encoder_fingerprint,
    extract_features,
)
from ssl_med.evaluators.knn import knn_scores
from ssl_med.evaluators.label_efficiency import stratified_subset
from ssl_med.evaluators.linear_probe import label_efficiency, probe_sweep
from ssl_med.evaluators.metrics import classification_metrics

from .conftest import tiny_vit


@pytest.fixture(scope="module")
def breast(breast_cfg: dict[str, Any]) -> ClassificationData:
    return load_eval_data(breast_cfg)


@pytest.fixture(scope="module")
def breast_feats(breast: ClassificationData) -> dict[str, np.ndarray]:
    return {s: extract_features(tiny_vit(), x) for s, x in breast.images.items()}


def test_medmnist_loader_keeps_official_splits_and_labels(
    breast: ClassificationData, breast_cfg: dict
) -> None:
    raw = np.load(breast_cfg["path"])
    assert breast.task == "binary" and breast.num_classes == 2
    for split, x in breast.images.items():
        assert x.shape[1:] == (1, 32, 32) and x.dtype == torch.float32
        assert 0 <= float(x.min()) and float(x.max()) <= 1
        assert len(x) == len(breast.labels[split]) == min(60, len(raw[f"{split}_labels"]))
        assert set(np.unique(breast.labels[split])) == {0, 1}


def test_features_match_encoder_pooled_and_cache_roundtrip(
    breast: ClassificationData, tmp_path: Path, monkeypatch
) -> None:
    encoder = tiny_vit()
    x = breast.images["val"]
    with torch.no_grad():
        out = encoder(x)
    both = extract_features(encoder, x, "pooled+mean_patch", batch_size=7)
    np.testing.assert_allclose(both[:, :32], out.pooled.numpy(), atol=1e-5)
    np.testing.assert_allclose(both[:, 32:], out.patch_tokens.mean(1).numpy(), atol=1e-5)

    first = cached_features(encoder, {"val": x}, "breast", "pooled", tmp_path)
    assert (tmp_path / encoder_fingerprint(encoder) / "breast-pooled.npz").is_file()
    # several read-outs at once: the cached one is read back, the others come from one extra pass
    both_modes = cached_readouts(encoder, {"val": x}, "breast", ["pooled", "mean_patch"], tmp_path)
    np.testing.assert_array_equal(both_modes["pooled"]["val"], first["val"])
    np.testing.assert_allclose(both_modes["mean_patch"]["val"], out.patch_tokens.mean(1).numpy(), atol=1e-5)
    monkeypatch.setattr(features_module, "extract_readouts", lambda *a, **k: pytest.fail("cache not used"))
    np.testing.assert_array_equal(
        cached_features(encoder, {"val": x}, "breast", "pooled", tmp_path)["val"], first["val"]
    )
    cached_readouts(encoder, {"val": x}, "breast", ["mean_patch", "pooled"], tmp_path)
    assert encoder_fingerprint(tiny_vit(seed=1)) != encoder_fingerprint(encoder)


def test_linear_probe_matches_independent_sklearn(breast: ClassificationData, breast_feats: dict) -> None:
    c_values = [1e-3, 1e-1, 10.0]
    ours = probe_sweep(breast_feats, breast.labels, "binary", c_values, "auroc")

    # independent: scikit-learn pipeline per C, choose on val AUROC, score test once
    val_auc = {}
    for c in c_values:
        pipe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000)).fit(
            breast_feats["train"], breast.labels["train"]
        )
        val_auc[c] = roc_auc_score(breast.labels["val"], pipe.predict_proba(breast_feats["val"])[:, 1])
    best = max(c_values, key=lambda c: val_auc[c])
    pipe = make_pipeline(StandardScaler(), LogisticRegression(C=best, max_iter=2000)).fit(
        breast_feats["train"], breast.labels["train"]
    )
    proba, y = pipe.predict_proba(breast_feats["test"]), breast.labels["test"]
    assert ours["C"] == best
    for c in c_values:
        assert math.isclose(ours["val"][str(c)], val_auc[c], abs_tol=1e-9)
    assert math.isclose(ours["test"]["auroc"], roc_auc_score(y, proba[:, 1]), abs_tol=1e-9)
    assert math.isclose(ours["test"]["accuracy"], accuracy_score(y, proba.argmax(1)), abs_tol=1e-9)
    assert math.isclose(
        ours["test"]["balanced_accuracy"], balanced_accuracy_score(y, proba.argmax(1)), abs_tol=1e-9
    )


def _knn_loop(train, train_y, query, num_classes, k, t):
    """Plain-Python weighted kNN (one query at a time)."""
    train, query = np.asarray(train, np.float64), np.asarray(query, np.float64)
    bank = train / np.linalg.norm(train, axis=1, keepdims=True)
    out = []
    for q in query:
        sims = bank @ (q / np.linalg.norm(q))
        order = sorted(range(len(sims)), key=lambda i: -sims[i])[:k]
        votes = [0.0] * num_classes
        for i in order:
            votes[train_y[i]] += math.exp(sims[i] / t)
        total = sum(votes)
        out.append([v / total for v in votes])
    return np.array(out)


def test_knn_matches_plain_loop_on_real_features(breast: ClassificationData, breast_feats: dict) -> None:
    ours = knn_scores(
        breast_feats["train"],
        breast.labels["train"],
        breast_feats["test"],
        2,
        k=20,
        temperature=0.07,
        chunk=16,
    )
    ref = _knn_loop(breast_feats["train"], breast.labels["train"], breast_feats["test"], 2, 20, 0.07)
    np.testing.assert_allclose(ours, ref, rtol=1e-9, atol=1e-12)


def test_knn_multiclass_random_features() -> None:
    rng = np.random.default_rng(0)
    train, query = rng.normal(size=(50, 8)), rng.normal(size=(7, 8))
    y = rng.integers(0, 4, size=50)
    np.testing.assert_allclose(
        knn_scores(train, y, query, 4, k=5, temperature=0.1),
        _knn_loop(train, y, query, 4, 5, 0.1),
        atol=1e-12,
    )


def test_metrics_follow_medmnist_semantics() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, size=40)
    scores = rng.dirichlet(np.ones(3), size=40)
    m = classification_metrics(scores, y, "multi-class")
    assert math.isclose(m["auroc"], roc_auc_score(y, scores, multi_class="ovr", average="macro"))
    assert math.isclose(m["accuracy"], float((scores.argmax(1) == y).mean()))
    ml_y = rng.integers(0, 2, size=(40, 4))
    ml_s = rng.random((40, 4))
    m = classification_metrics(ml_s, ml_y, "multi-label")
    assert math.isclose(m["auroc"], np.mean([roc_auc_score(ml_y[:, i], ml_s[:, i]) for i in range(4)]))
    assert math.isclose(m["accuracy"], float(((ml_s > 0.5) == ml_y).mean()))


def test_stratified_subset_is_seeded_and_keeps_every_class() -> None:
    labels = np.array([0] * 90 + [1] * 10)
    idx = stratified_subset(labels, 0.1, seed=3)
    assert np.bincount(labels[idx]).tolist() == [9, 1]
    np.testing.assert_array_equal(idx, stratified_subset(labels, 0.1, seed=3))
    assert not np.array_equal(idx, stratified_subset(labels, 0.1, seed=4))
    assert np.bincount(labels[stratified_subset(labels, 0.01)]).tolist() == [1, 1]


def test_a_capped_subset_holds_its_limit_with_many_label_combinations() -> None:
    """Multi-label data with more label combinations than the limit (ChestMNIST-like): stratification alone
    would keep one item per combination; the cap holds, without repeats, and is seeded."""
    from ssl_med.evaluators.datasets import _subset

    labels = (np.random.default_rng(0).random((3000, 12)) < 0.3).astype(np.int64)
    assert len(np.unique(labels, axis=0)) > 500
    idx = _subset(len(labels), 200, labels)
    assert len(idx) == 200 == len(np.unique(idx)) and (np.diff(idx) > 0).all()
    np.testing.assert_array_equal(idx, _subset(len(labels), 200, labels))
    assert len(_subset(100, 40, np.array([0] * 90 + [1] * 10))) == 40


def test_label_efficiency_chooses_read_out_and_c_on_val_per_subset(breast: ClassificationData, breast_feats: dict) -> None:
    """Per subset: every (read-out, C) fitted on the subset alone, the best on val scored on test (sklearn reference)."""
    rng = np.random.default_rng(0)
    noise = {s: rng.standard_normal(f.shape).astype(np.float32) for s, f in breast_feats.items()}
    feats = {"noise": noise, "pooled": breast_feats}
    cfg = {"label_fractions": [0.5, 1.0], "seeds": [0, 1], "C": [1e-2, 1.0], "select_metric": "auroc"}
    curve, chosen = label_efficiency(feats, breast, cfg, seed=5)

    y = breast.labels
    for fraction, draws in ((0.5, [5, 6]), (1.0, [5])):
        aucs, modes = [], []
        for draw in draws:
            idx = stratified_subset(y["train"], fraction, seed=draw)
            best = None
            for mode, x in feats.items():  # insertion order: the first of equal val scores wins
                for c in cfg["C"]:
                    pipe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=2000)).fit(x["train"][idx], y["train"][idx])
                    val = roc_auc_score(y["val"], pipe.predict_proba(x["val"])[:, 1])
                    if best is None or val > best[0]:
                        best = (val, mode, roc_auc_score(y["test"], pipe.predict_proba(x["test"])[:, 1]))
            modes.append(best[1])
            aucs.append(best[2])
        assert chosen[str(fraction)] == modes
        mean, std, n = curve[str(fraction)]["auroc"]
        assert n == len(draws) and math.isclose(mean, float(np.mean(aucs)), abs_tol=1e-9)
        assert math.isclose(std, float(np.std(aucs)), abs_tol=1e-9)
    assert chosen["1.0"] == ["pooled"]  # the encoder's features, not the noise, on the full labels
