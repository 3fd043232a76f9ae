"""Collapse diagnostics: RankMe effective rank against an independent computation, and the monitor's
distinction between a collapsed representation and one with a large shared offset."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch

from ssl_med.train.collapse import CollapseMonitor, effective_rank, embedding_std


def rankme_numpy(x: np.ndarray) -> float:
    """RankMe (Garrido et al. 2023) of centred ``x`` with numpy's SVD: exp of the entropy of s / sum(s)."""
    s = np.linalg.svd(x - x.mean(0), compute_uv=False)
    p = s / s.sum()
    p = p[p > 0]
    return float(np.exp(-(p * np.log(p)).sum()))


def test_effective_rank_matches_numpy_and_known_values() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 32, generator=g, dtype=torch.float64)
    assert effective_rank(x) == pytest.approx(rankme_numpy(x.numpy()), rel=1e-10)
    # k orthogonal directions with equal spread: exactly k
    basis = torch.linalg.qr(torch.randn(32, 32, generator=g, dtype=torch.float64))[0][:, :3]
    signs = torch.tensor([[1.0, 1, 1], [-1, 1, 1], [1, -1, 1], [1, 1, -1], [-1, -1, 1], [-1, 1, -1], [1, -1, -1], [-1, -1, -1]], dtype=torch.float64)
    assert effective_rank(signs @ basis.T) == pytest.approx(3.0, rel=1e-9)
    assert effective_rank(torch.ones(16, 8) * 3.0) == 1.0  # one point
    assert 20.0 < effective_rank(x) < 32.0


def test_a_shared_offset_lowers_the_spread_but_not_the_rank() -> None:
    g = torch.Generator().manual_seed(1)
    varied = torch.randn(128, 64, generator=g)
    offset = varied + 200.0 * torch.randn(1, 64, generator=g)  # MAE-like: one large common direction
    assert embedding_std(offset) < 0.1 * embedding_std(varied)
    assert effective_rank(offset) == pytest.approx(effective_rank(varied), rel=1e-3)


def test_monitor_warns_on_collapse_not_on_anisotropy(caplog: pytest.LogCaptureFixture) -> None:
    ideal = 1 / math.sqrt(192)
    with caplog.at_level(logging.INFO, logger="ssl_med.train.collapse"):
        anisotropic = CollapseMonitor(patience=3)
        assert not any(anisotropic.update(0.0005, ideal, s, rank=60.0, max_rank=64) for s in range(10))
        collapsed = CollapseMonitor(patience=3)
        fired = [collapsed.update(0.0005, ideal, s, rank=1.0, max_rank=64) for s in range(10)]
    assert fired.count(True) == 1 and fired.index(True) == 2
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "effective rank 1.0 of 64" in warnings[0].getMessage()
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert len(infos) == 1 and "not a collapse" in infos[0]
