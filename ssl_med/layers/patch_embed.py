"""Patch embedding and (un)patchify for 2D and 3D inputs."""

from __future__ import annotations

import math
from collections.abc import Sequence

from torch import Tensor, nn

from ssl_med.utils import to_tuple


class PatchEmbed(nn.Module):
    """Non-overlapping patch embedding by a strided convolution, 2D or 3D.

    The parameter names (``proj.weight``, ``proj.bias``) match timm's ``PatchEmbed`` for 2D.

    Args:
        spatial_dims: 2 or 3.
        patch_size: int or one size per spatial axis.
        in_chans: input channels C.
        embed_dim: token width D.
        groups: 1 (the channels are fused into each token), or ``in_chans`` for one kernel per channel
            (``groups * embed_dim`` output maps; see ``backbones.channel_tokens.ModalityPatchEmbed``).

    Shapes:
        input ``(B, C, *S)`` with every ``S_i`` a multiple of the patch; output tokens ``(B, N, D)``
        in raster order (last axis fastest) and the grid ``S_i / p_i`` with ``N = prod(grid)``.
    """

    def __init__(
        self, spatial_dims: int, patch_size: int | Sequence[int], in_chans: int, embed_dim: int, groups: int = 1
    ) -> None:
        super().__init__()
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        self.spatial_dims = spatial_dims
        self.patch_size = to_tuple(patch_size, spatial_dims)
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.proj = conv(in_chans, groups * embed_dim, kernel_size=self.patch_size, stride=self.patch_size, groups=groups)

    def grid_shape(self, spatial_shape: Sequence[int]) -> tuple[int, ...]:
        """Token grid for an input of ``spatial_shape``; raises if it is not a multiple of the patch."""
        return grid_shape(spatial_shape, self.patch_size)

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"expected a (B, C, {'D, ' if self.spatial_dims == 3 else ''}H, W) tensor for "
                f"spatial_dims={self.spatial_dims}, got shape {tuple(x.shape)}"
            )
        if x.shape[1] != self.proj.in_channels:
            raise ValueError(f"expected {self.proj.in_channels} input channels, got {x.shape[1]}")
        grid = self.grid_shape(x.shape[2:])
        tokens = self.proj(x).flatten(2).transpose(1, 2)
        return tokens, grid


def grid_shape(spatial_shape: Sequence[int], patch_size: Sequence[int]) -> tuple[int, ...]:
    """``spatial_shape / patch_size`` per axis, with a clear error when not divisible."""
    if len(spatial_shape) != len(patch_size):
        raise ValueError(f"input has {len(spatial_shape)} spatial axes, patch size {tuple(patch_size)}")
    bad = [(s, p) for s, p in zip(spatial_shape, patch_size) if s % p]
    if bad:
        raise ValueError(f"input size {tuple(spatial_shape)} is not a multiple of the patch size {tuple(patch_size)}")
    return tuple(s // p for s, p in zip(spatial_shape, patch_size))


def patchify(x: Tensor, patch_size: Sequence[int]) -> Tensor:
    """Split ``(B, C, *S)`` into patch vectors ``(B, N, prod(p) * C)``.

    Tokens are in raster order (as :class:`PatchEmbed`); each vector is ordered (pixels of the patch in
    raster order, then channel), as MAE's ``patchify``.
    """
    b, c, *spatial = x.shape
    grid = grid_shape(spatial, patch_size)
    nd = len(grid)
    # (B, C, g1, p1, g2, p2, ...) -> (B, g1, g2, ..., p1, p2, ..., C)
    shape = [b, c] + [v for g, p in zip(grid, patch_size) for v in (g, p)]
    x = x.reshape(shape)
    perm = [0] + [2 + 2 * i for i in range(nd)] + [3 + 2 * i for i in range(nd)] + [1]
    return x.permute(perm).reshape(b, math.prod(grid), math.prod(patch_size) * c)


def unpatchify(tokens: Tensor, grid: Sequence[int], patch_size: Sequence[int], channels: int) -> Tensor:
    """Inverse of :func:`patchify`: ``(B, N, prod(p) * C)`` -> ``(B, C, *S)``."""
    b = tokens.shape[0]
    nd = len(grid)
    x = tokens.reshape([b, *grid, *patch_size, channels])
    perm = [0, 2 * nd + 1] + [v for i in range(nd) for v in (1 + i, 1 + nd + i)]
    x = x.permute(perm)
    return x.reshape([b, channels] + [g * p for g, p in zip(grid, patch_size)])
