"""Histogram-of-oriented-gradients targets per patch (MaskFeat, Wei et al., CVPR 2022), for masked modelling.

MaskFeat predicts, for each masked patch, the HOG descriptor of that patch instead of its pixels: gradient
orientations binned by gradient magnitude over small cells, the cell histograms of a patch concatenated and
L2-normalised over the patch. The descriptor keeps edges and shape and discards brightness and contrast (a
constant offset has no gradient; the normalisation removes the gain), and averaging over cells damps
pixel noise such as ultrasound speckle.

The descriptor follows Dalal and Triggs (CVPR 2005) as :func:`skimage.feature.hog` computes it, restricted to
blocks that are the patches: central-difference gradients (zero on the border rows and columns), unsigned
orientations in ``[0, 180)`` degrees, hard binning into ``bins`` equal sectors weighted by the gradient
magnitude, each cell's histogram the mean over its pixels, and each patch's cells normalised together,
``v / sqrt(|v|^2 + eps^2)`` (skimage's ``block_norm="L2"``). Channels are described one by one and
concatenated (MaskFeat does the same for RGB). 2D only.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

HOG_EPS = 1.0e-5


def hog_dim(patch_size: Sequence[int], cell_size: int, channels: int, bins: int = 9) -> int:
    """Length of one patch's descriptor: ``channels * (cells per patch) * bins``."""
    check_hog_geometry(patch_size, cell_size)
    return channels * (patch_size[0] // cell_size) * (patch_size[1] // cell_size) * bins


def check_hog_geometry(patch_size: Sequence[int], cell_size: int) -> None:
    """Refuse what the descriptor cannot describe: a 3D patch, or cells that do not tile the patch."""
    if len(patch_size) != 2:
        raise ValueError(f"HOG targets are 2D only; the encoder's patch is {tuple(patch_size)}")
    if cell_size < 1 or any(p % cell_size for p in patch_size):
        raise ValueError(f"HOG cell size {cell_size} must divide the patch size {tuple(patch_size)}")


def default_cell_size(patch_size: Sequence[int]) -> int:
    """MaskFeat's layout, 2 x 2 cells per patch (8 px cells in 16 px patches), where the patch is even;
    one cell per patch otherwise."""
    side = min(patch_size)
    return side // 2 if all(p % 2 == 0 for p in patch_size) and side >= 2 else side


def hog_targets(images: Tensor, patch_size: Sequence[int], cell_size: int, bins: int = 9) -> Tensor:
    """HOG descriptor of every patch, in the patch order of :func:`~ssl_med.layers.patch_embed.patchify`.

    Shapes: ``images (B, C, H, W)`` with ``H, W`` multiples of the patch -> ``(B, N, C * k_h * k_w * bins)``,
    ``N = (H / p_h) * (W / p_w)``, ``k = p / cell_size`` cells per patch side; per patch the layout is
    ``(channel, cell row, cell column, bin)``. Computed in float32, without gradients.
    """
    check_hog_geometry(patch_size, cell_size)
    b, c, h, w = images.shape
    ph, pw = patch_size
    if h % ph or w % pw:
        raise ValueError(f"image {h}x{w} is not a multiple of the patch {ph}x{pw}")
    with torch.no_grad():
        x = images.float()
        g_row, g_col = torch.zeros_like(x), torch.zeros_like(x)
        g_row[..., 1:-1, :] = x[..., 2:, :] - x[..., :-2, :]
        g_col[..., :, 1:-1] = x[..., :, 2:] - x[..., :, :-2]
        magnitude = torch.hypot(g_row, g_col)
        orientation = torch.remainder(torch.rad2deg(torch.atan2(g_row, g_col)), 180.0)
        sector = torch.div(orientation, 180.0 / bins, rounding_mode="floor").long().clamp_(0, bins - 1)
        per_bin = x.new_zeros(b, c, bins, h, w).scatter_(2, sector.unsqueeze(2), magnitude.unsqueeze(2))
        cells = F.avg_pool2d(per_bin.view(b, c * bins, h, w), cell_size)  # (B, C * bins, H / cell, W / cell)
        kh, kw = ph // cell_size, pw // cell_size
        gh, gw = h // ph, w // pw
        cells = cells.view(b, c, bins, gh, kh, gw, kw).permute(0, 3, 5, 1, 4, 6, 2)  # (B, gh, gw, C, kh, kw, bins)
        per_channel = cells.reshape(b, gh * gw, c, kh * kw * bins)
        norm = (per_channel.square().sum(dim=-1, keepdim=True) + HOG_EPS**2).sqrt()
        return (per_channel / norm).reshape(b, gh * gw, -1)
