"""U-MAE's uniformity term against a float64 loop over pairs, its bounds, and what its gradient does."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from objectives.losses.uniformity import spectral_uniformity
from ssl_med.train.collapse import effective_rank


def reference_uniformity(z: np.ndarray) -> float:
    unit = z / np.linalg.norm(z, axis=1, keepdims=True)
    b = len(unit)
    return sum(float(unit[i] @ unit[j]) ** 2 for i in range(b) for j in range(b)) / b**2


def test_matches_the_pairwise_reference() -> None:
    z = torch.randn(7, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 3.0
    assert spectral_uniformity(z).item() == pytest.approx(reference_uniformity(z.numpy()), rel=1e-12)
    half = z.to(torch.bfloat16)
    assert spectral_uniformity(half).dtype == torch.float32  # upcast, not reduced in bf16


def test_bounds_parallel_and_isotropic() -> None:
    parallel = torch.randn(1, 6).repeat(4, 1) * torch.tensor([[1.0], [2.0], [0.5], [3.0]])
    assert spectral_uniformity(parallel).item() == pytest.approx(1.0)
    basis = torch.eye(6) * 2.0  # B = D orthogonal directions: S = I / D
    assert spectral_uniformity(basis).item() == pytest.approx(1 / 6)
    with pytest.raises(ValueError, match="B >= 2"):
        spectral_uniformity(torch.randn(1, 6))


def test_its_gradient_spreads_collapsed_embeddings() -> None:
    """Embeddings squeezed into two directions are spread over more by descending the term."""
    g = torch.Generator().manual_seed(1)
    z = (torch.randn(64, 2, generator=g) @ torch.randn(2, 16, generator=g) + 0.01 * torch.randn(64, 16, generator=g))
    z.requires_grad_(True)
    before = effective_rank(z.detach())
    optimiser = torch.optim.Adam([z], lr=0.05)
    for _ in range(200):
        optimiser.zero_grad()
        spectral_uniformity(z).backward()
        optimiser.step()
    assert before < 3.0
    assert effective_rank(z.detach()) > 5 * before
    assert spectral_uniformity(z).item() == pytest.approx(1 / 16, rel=1e-3)  # its minimum, 1 / min(B, D)
