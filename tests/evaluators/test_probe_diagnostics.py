"""Linear-probe diagnostics: the C-at-grid-edge warning and the folded L-BFGS convergence warnings."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from sklearn.exceptions import ConvergenceWarning

from ssl_med.evaluators import linear_probe as probe_module
from ssl_med.evaluators.base import EvalContext
from ssl_med.evaluators.datasets import ClassificationData
from ssl_med.evaluators.linear_probe import grid_edge

LOGGER = "ssl_med.evaluators.linear_probe"


def separable_data(n: int = 40) -> tuple[ClassificationData, dict[str, np.ndarray]]:
    """Binary labels ``y = x > 0`` of one feature ``(N, 1)``: every C ranks val perfectly (AUROC 1),
    so the sweep keeps the first C of the grid."""
    rng = np.random.default_rng(0)
    feats, labels = {}, {}
    for split in ("train", "val", "test"):
        x = rng.normal(size=(n, 1))
        feats[split], labels[split] = x, (x[:, 0] > 0).astype(np.int64)
    images = {s: torch.zeros(n, 1, 8, 8) for s in feats}
    return ClassificationData("toy", "binary", images, labels, 2), feats


def noisy_data(n: int = 60, d: int = 30) -> tuple[ClassificationData, dict[str, np.ndarray]]:
    """Random features ``(N, D)`` and labels: L-BFGS needs many iterations."""
    rng = np.random.default_rng(0)
    feats = {s: rng.normal(size=(n, d)) for s in ("train", "val", "test")}
    labels = {s: np.arange(n) % 2 for s in feats}
    images = {s: torch.zeros(n, 1, 8, 8) for s in feats}
    return ClassificationData("toy", "binary", images, labels, 2), feats


def run_probe(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, data: ClassificationData, feats: dict, **cfg: Any
) -> dict[str, Any]:
    """The ``linear_probe`` evaluator on given features (feature extraction replaced)."""
    monkeypatch.setattr(probe_module, "cached_readouts", lambda enc, images, key, modes, *a, **k: dict.fromkeys(modes, feats))
    full = {
        "features": "pooled",
        "select_metric": "auroc",
        "label_fractions": [],
        "seeds": [0],
        "batch_size": 8,
    }
    ctx = EvalContext(tmp_path, "pretrained", "toy")
    return probe_module.linear_probe(None, {**full, **cfg}, data, ctx).details  # type: ignore[arg-type]


def test_grid_edge() -> None:
    assert grid_edge(1e-4, [1e-4, 1.0, 1e4]) == "smallest"
    assert grid_edge(1e4, [1.0, 1e4, 1e-4]) == "largest"
    assert grid_edge(1.0, [1e-4, 1.0, 1e4]) is None
    assert grid_edge(1.0, [1.0]) is None


@pytest.mark.parametrize(
    ("grid", "edge"),
    [([1e-3, 1.0, 1e3], "smallest"), ([1e3, 1e-3, 1.0], "largest"), ([1.0, 1e-3, 1e3], None)],
)
def test_edge_of_grid_warning(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    grid: list,
    edge: str | None,
) -> None:
    data, feats = separable_data()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        details = run_probe(monkeypatch, tmp_path, data, feats, C=grid)
    assert details["C"] == grid[0]  # ties keep the first C
    edge_lines = [r for r in caplog.records if "grid" in r.getMessage()]
    if edge is None:
        assert not edge_lines and "C_at_grid_edge" not in details
    else:
        assert len(edge_lines) == 1 and "[pretrained]" in edge_lines[0].getMessage()
        assert edge in details["C_at_grid_edge"] and "extend eval.C" in details["C_at_grid_edge"]


def test_convergence_warnings_are_folded_into_one_line(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data, feats = noisy_data()
    cfg = {"C": [0.1, 1.0, 10.0], "max_iter": 2, "label_fractions": [0.5, 1.0], "seeds": [0, 1]}
    with warnings.catch_warnings(record=True) as caught, caplog.at_level(logging.WARNING, logger=LOGGER):
        warnings.simplefilter("always")
        details = run_probe(monkeypatch, tmp_path, data, feats, **cfg)
    assert not [w for w in caught if issubclass(w.category, ConvergenceWarning)]
    lines = [r.getMessage() for r in caplog.records if "did not converge" in r.getMessage()]
    fits = 3 * (1 + 2 + 1)  # headline sweep + two seeds at 50% + one at 100%, three C values each
    assert len(lines) == 1 and f"{fits} of {fits} L-BFGS fits" in lines[0] and "max_iter=2" in lines[0]
    assert details["convergence"] == {"fits": fits, "not_converged": fits, "max_iter": 2}


def test_converged_run_logs_nothing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data, feats = separable_data()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        details = run_probe(monkeypatch, tmp_path, data, feats, C=[1.0, 1e-3, 1e3])
    assert not caplog.records and details["convergence"]["not_converged"] == 0
