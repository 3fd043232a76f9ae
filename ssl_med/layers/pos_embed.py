"""Fixed sin-cos position embeddings (2D, 3D) and resampling of learned ones to a new grid."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor


def _sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """``(N,) -> (N, dim)``: ``[sin(pos * w) | cos(pos * w)]`` with ``w_d = 1 / 10000^(d / (dim/2))``."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even width, got {dim}")
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))
    angles = positions.to(torch.float64)[:, None] * omega[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_pos_embed(grid: Sequence[int], dim: int) -> Tensor:
    """Fixed sin-cos embedding of a raster-ordered token grid: ``(prod(grid), dim)`` float32.

    2D follows MAE's convention (first half of the channels encodes the column ``w``, second half the
    row ``h``). 3D splits ``dim`` into three even parts for ``(w, h, d)`` (Hi-End-MAE's convention:
    the last axis first); leftover channels are zero.
    """
    nd = len(grid)
    part = (dim // nd) // 2 * 2
    if part == 0:
        raise ValueError(f"embedding width {dim} too small for a {nd}D grid")
    coords = torch.meshgrid(*[torch.arange(g) for g in grid], indexing="ij")
    # reversed: the fastest (last) axis comes first, as MAE's 2D (w then h)
    parts = [_sincos_1d(part, c.reshape(-1)) for c in reversed(coords)]
    emb = torch.cat(parts, dim=1)
    if emb.shape[1] < dim:
        emb = torch.cat([emb, emb.new_zeros(emb.shape[0], dim - emb.shape[1])], dim=1)
    return emb.float()


def resample_pos_embed(pos: Tensor, old_grid: Sequence[int], new_grid: Sequence[int]) -> Tensor:
    """Interpolate a learned patch position embedding ``(1, N_old, D)`` to ``(1, N_new, D)``.

    Bicubic in 2D, trilinear in 3D (``align_corners=False``, antialias off as DINOv2; equal to timm's
    ``resample_abs_pos_embed(..., antialias=False)`` - timm's default ``antialias=True`` switches torch
    to a different cubic kernel, so timm's ``dynamic_img_size`` differs slightly at other sizes).
    """
    old_grid, new_grid = tuple(old_grid), tuple(new_grid)
    if old_grid == new_grid:
        return pos
    nd = len(old_grid)
    d = pos.shape[-1]
    grid_pos = pos.reshape(1, *old_grid, d).movedim(-1, 1).float()
    mode = "bicubic" if nd == 2 else "trilinear"
    out = F.interpolate(grid_pos, size=new_grid, mode=mode, align_corners=False)
    return out.movedim(1, -1).reshape(1, -1, d).to(pos.dtype)
