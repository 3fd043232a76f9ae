"""scripts/diagnose_readout.py: the conditioning numbers against scikit-learn, a gradient-trained head that
misses a label of tiny variance a closed-form probe finds, and the command on a saved encoder."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA
from sklearn.linear_model import LinearRegression
from sklearn.preprocessing import StandardScaler

from ssl_med.export import save_encoder
from ssl_med.registry import BACKBONES
from ssl_med.train.online_eval import ridge_probe_scores

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
diagnose = pytest.importorskip("diagnose_readout")


def nearly_collinear(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(n, 6)`` features: a large shared signal on every column, the label in the small difference of two."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    shared = rng.normal(size=(n, 1)) * 10.0
    x = shared + rng.normal(size=(n, 6)) * 0.01
    x[:, 1] += 0.05 * (labels - 0.5)  # columns 0 and 1 differ by the label, at 1/400 of the shared spread
    return x, labels


def test_conditioning_matches_scikit_learn() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 12)) @ rng.normal(size=(12, 12)) * rng.uniform(0.1, 5.0, 12)
    labels = (x[:, 3] - 0.5 * x[:, 7] + rng.normal(size=300) > 0).astype(int)
    cells = diagnose.conditioning(x, labels, 2)
    z = StandardScaler().fit_transform(x)
    pca = PCA().fit(z)
    assert cells["top-5 variance"] == pytest.approx(pca.explained_variance_ratio_[:5].sum(), abs=1e-9)
    assert cells["top-20 variance"] == pytest.approx(1.0, abs=1e-9)  # 12 features: every direction
    scores = pca.transform(z)
    for k, column in ((5, "label R² top-5"), (12, "label R² all")):
        fit = LinearRegression().fit(scores[:, :k], labels)
        assert cells[column] == pytest.approx(fit.score(scores[:, :k], labels), abs=1e-9)
    all_features = LinearRegression().fit(x, labels)  # all directions = the features themselves
    assert cells["label R² all"] == pytest.approx(all_features.score(x, labels), abs=1e-9)
    assert 1.0 <= cells["eff. rank"] <= 12.0


def test_a_gradient_head_misses_a_label_the_closed_form_probe_reads() -> None:
    x, labels = nearly_collinear(600, seed=1)
    val, val_labels = nearly_collinear(300, seed=2)
    cells = diagnose.conditioning(x, labels, 2)
    assert cells["top-5 variance"] > 0.99 and cells["label R² all"] > 0.5  # a label of tiny variance
    scores, _ = ridge_probe_scores(x, labels, val, 2, [1e-6, 1e-4, 1e-2], "binary")
    probe = ((scores[:, 1] > 0.5) == val_labels).mean()
    curve = diagnose.head_curve(x, labels, val, val_labels, "binary", 2, [50, 200], lr=1e-3, seed=0)
    assert probe > 0.9
    assert max(curve) < 0.75  # AUROC: the head has not found the direction of tiny variance


def _saved_encoder(folder: Path) -> Path:
    backbone = {"spatial_dims": 2, "in_chans": 1, "img_size": [28, 28], "patch_size": 7, "embed_dim": 32, "depth": 1,
                "num_heads": 2}
    torch.manual_seed(3)
    config = {"backbone": {"name": "vit", **backbone}, "objective": {"name": "mae"}, "data": {"name": "demo"}}
    save_encoder(BACKBONES.build("vit", **backbone), folder / "encoder", config, model_card=False)
    return folder


def _diagnose(shared_data: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "scripts/diagnose_readout.py", *args], cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "SSL_MED_SHARED_DATA": str(shared_data), "OMP_NUM_THREADS": "1"},
    )


def test_a_segmentation_set_is_refused_by_name(tmp_path: Path, shared_data: Path) -> None:
    out = _diagnose(shared_data, "--checkpoint", str(_saved_encoder(tmp_path / "run")), "--data", "brats")
    assert out.returncode != 0 and "--data brats: a single-label classification set is needed" in out.stderr


def test_the_command_writes_a_row_per_encoder(tmp_path: Path, shared_data: Path) -> None:
    doc = tmp_path / "diagnosis.md"
    out = _diagnose(shared_data, "--checkpoint", str(_saved_encoder(tmp_path / "run")), "--data", "breastmnist",
                    "--steps", "10", "30", "--doc", str(doc))
    assert out.returncode == 0, out.stderr[-2000:]
    text = doc.read_text()
    assert "Read-out `mean_patch`" in text  # auto: MAE's read-out
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in text.splitlines() if line.startswith("| pretrained") or line.startswith("| random")]
    assert [r[0] for r in rows] == ["pretrained", "random init"]
    for row in rows:
        values = [float(v) for v in row[1:]]
        assert len(values) == len(diagnose.COLUMNS) + 3  # the probe and two head steps
        assert all(0.0 <= v <= 1.0 for v in values[1:])
    assert rows[0][1:] != rows[1][1:]  # two different encoders
