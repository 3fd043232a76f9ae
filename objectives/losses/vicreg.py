"""VICReg first-order terms (Bardes et al., ICLR 2022; VICRegL, NeurIPS 2022) on two views' embeddings.

For projected embeddings ``x, y`` ``(B, D)`` of the two views of the same ``B`` images:

* invariance ``inv = 1/(B D) sum_{b,d} (x_bd - y_bd)^2`` (``F.mse_loss``);
* variance ``var = 1/2 [mean_d relu(1 - s^x_d) + mean_d relu(1 - s^y_d)]`` with
  ``s_d = sqrt(Var_b(x_bd) + eps)`` (unbiased variance, ``eps = 1e-4``): a hinge keeping every
  dimension's standard deviation above 1 (anti-collapse);
* covariance ``cov = 1/2 [sum_{d != e} C^x_de^2 / D + sum_{d != e} C^y_de^2 / D]`` with
  ``C = (x - mean)^T (x - mean) / (B - 1)``: decorrelates the dimensions.

The terms are returned unweighted; VICReg's weights are ``inv 25, var 25, cov 1``. The ``1/2`` on the
covariance (averaging the two views instead of summing them) is the VICRegL / LVM-Med-lineage form;
original VICReg sums the two covariance terms (equivalent to a covariance weight of 2 here).

Statistics are over the local batch only (VICReg all-gathers the embeddings across GPUs first);
half-precision inputs are upcast to float32 and the terms computed outside autocast.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class VICRegTerms(NamedTuple):
    """Unweighted VICReg terms (scalars)."""

    inv: Tensor
    var: Tensor
    cov: Tensor


def _std_hinge(x: Tensor, eps: float) -> Tensor:
    std = torch.sqrt(x.var(dim=0) + eps)
    return F.relu(1.0 - std).mean()


def _off_diagonal_cov(x: Tensor) -> Tensor:
    """``sum_{d != e} C_de^2 / D`` of the covariance of ``x`` ``(B, D)``."""
    b, d = x.shape
    xc = x - x.mean(dim=0, keepdim=True)
    cov = xc.T @ xc / (b - 1)
    off = cov - torch.diag_embed(torch.diagonal(cov))
    return off.pow(2).sum() / d


def vicreg_terms(x: Tensor, y: Tensor, eps: float = 1e-4) -> VICRegTerms:
    """Invariance, variance and covariance terms of embeddings ``x, y`` ``(B, D)``, ``B >= 2``."""
    if x.shape != y.shape or x.ndim != 2:
        raise ValueError(
            f"expected two (B, D) embeddings of the same shape, got {tuple(x.shape)}, {tuple(y.shape)}"
        )
    if x.shape[0] < 2:
        raise ValueError("VICReg needs at least 2 images per batch")
    if x.dtype in (torch.float16, torch.bfloat16):
        x, y = x.float(), y.float()
    # autocast off: it would run the covariance matmul in bf16/fp16 again
    with torch.autocast(device_type=x.device.type, enabled=False):
        inv = F.mse_loss(x, y)
        var = (_std_hinge(x, eps) + _std_hinge(y, eps)) / 2
        cov = (_off_diagonal_cov(x) + _off_diagonal_cov(y)) / 2
    return VICRegTerms(inv, var, cov)
