"""The building layers of Vision-LSTM (``backbone=xlstm``, :mod:`backbones.xlstm`).

Residual-weight norms, the block-diagonal q/k/v projection, the two token convolutions (ViL v1's causal
1D one and v2's depthwise one over the token grid, with its 3D analogue) and xLSTM's two normal inits,
after NX-AI/vision-lstm (``vision_lstm_util.py``; Alkin et al., "Vision-LSTM", ICLR 2025).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_med.ops import selective_scan_fused


class ResidualLayerNorm(nn.Module):
    """LayerNorm over the last axis with a residual weight: scale ``1 + weight`` (``weight`` init 0).

    Shapes: ``(..., D) -> (..., D)``.
    """

    def __init__(self, dim: int, eps: float = 1e-5, bias: bool = True) -> None:
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.zeros(dim))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, (self.dim,), 1.0 + self.weight, self.bias, self.eps)


class MultiHeadLayerNorm(ResidualLayerNorm):
    """Per-head LayerNorm (a group norm with one group per head) with residual weight.

    Shapes: ``(B, NH, L, DH) -> (B, NH, L, DH)``; ``dim = NH * DH``.
    """

    def forward(self, x: Tensor) -> Tensor:
        b, nh, length, dh = x.shape
        flat = x.transpose(1, 2).reshape(b * length, nh * dh)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        out = F.group_norm(flat, nh, (1.0 + self.weight).to(x.dtype), bias, self.eps)
        return out.view(b, length, nh, dh).transpose(1, 2)


class LinearHeadwise(nn.Module):
    """Block-diagonal linear map: ``dim / block_size`` independent ``block_size x block_size`` blocks.

    ``weight``: ``(dim / block_size, block_size, block_size)`` (out, in per block). Shapes:
    ``(..., dim) -> (..., dim)``.

    The product runs on groups of ``g = gcd(num_blocks, group_blocks)`` neighbouring blocks, each
    group one block-diagonal ``(g * block_size)``-square matrix with zeros off its diagonal blocks:
    a batch of 16 x 16 products is faster on CPU than four times as many 4 x 4 ones although it
    multiplies by zeros (ViL-S, 192 blocks of 4: forward+backward of the projection ~30% faster).
    """

    #: blocks per group of the product (see the class docstring); 1 multiplies each block alone
    group_blocks = 4

    def __init__(self, dim: int, block_size: int, bias: bool = True) -> None:
        super().__init__()
        if dim % block_size:
            raise ValueError(f"dim {dim} is not a multiple of the q/k/v block size {block_size}")
        self.num_blocks, self.block_size = dim // block_size, block_size
        self.weight = nn.Parameter(torch.empty(self.num_blocks, block_size, block_size))
        self.bias = nn.Parameter(torch.zeros(dim)) if bias else None

    def grouped_weight(self) -> Tensor:
        """The weight as ``(num_blocks / g, g * block_size, g * block_size)`` block-diagonal matrices."""
        g, bs = math.gcd(self.num_blocks, self.group_blocks), self.block_size
        weight = self.weight.view(self.num_blocks // g, g, bs, bs)  # (groups, block j, out, in)
        eye = torch.eye(g, dtype=weight.dtype, device=weight.device)
        # [n, (j, o), (k, i)] = weight[n, j, o, i] if j == k else 0
        return torch.einsum("njoi,jk->njoki", weight, eye).reshape(self.num_blocks // g, g * bs, g * bs)

    def forward(self, x: Tensor) -> Tensor:
        weight = self.grouped_weight()
        groups = x.unflatten(-1, (weight.shape[0], weight.shape[-1]))
        out = torch.einsum("...hi,hoi->...ho", groups, weight).flatten(-2)
        return out if self.bias is None else out + self.bias


class CausalConv1d(nn.Module):
    """Depthwise causal 1D convolution over the sequence (ViL v1): output ``t`` sees inputs ``t-k+1 .. t``.

    Shapes: ``(B, L, C) -> (B, L, C)``.
    """

    def __init__(self, channels: int, kernel_size: int = 4, bias: bool = True) -> None:
        super().__init__()
        self.kernel_size = kernel_size
        self.conv = nn.Conv1d(channels, channels, kernel_size, groups=channels, bias=bias)

    def forward(self, x: Tensor, grid: tuple[int, ...], positions: Tensor | None) -> Tensor:
        x = F.pad(x.transpose(1, 2), (self.kernel_size - 1, 0))  # left padding only
        return self.conv(x).transpose(1, 2)


class GridConv(nn.Module):
    """Depthwise ``k^d`` convolution over the token grid (ViL v2's ``SequenceConv2d``, and its 3D analogue).

    Args:
        spatial_dims: 2 or 3.
        channels: C (depthwise: one filter per channel).
        kernel_size: odd, ``padding = k // 2`` keeps the grid.

    Shapes: ``(B, L, C) -> (B, L, C)``. With ``positions=None`` the ``L = prod(grid)`` tokens fill the grid
    in raster order; otherwise ``positions (B, L)`` are their raster indices in the grid, the other cells
    are zero (visible-only forward).
    """

    def __init__(self, spatial_dims: int, channels: int, kernel_size: int = 3, bias: bool = True) -> None:
        super().__init__()
        if kernel_size % 2 != 1:
            raise ValueError(f"the grid conv needs an odd kernel size, got {kernel_size}")
        conv = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
        self.conv = conv(
            channels, channels, kernel_size, padding=kernel_size // 2, groups=channels, bias=bias
        )

    def forward(self, x: Tensor, grid: tuple[int, ...], positions: Tensor | None) -> Tensor:
        b, length, c = x.shape
        n = math.prod(grid)
        if positions is None:
            if length != n:
                raise ValueError(f"{length} tokens do not fill the grid {grid}")
            full = x
        else:
            index = positions[..., None].expand(-1, -1, c)
            full = x.new_zeros(b, n, c).scatter(1, index, x)
        out = self.conv_tokens(full, grid)
        return out if positions is None else torch.gather(out, 1, index)

    def conv_tokens(self, x: Tensor, grid: tuple[int, ...]) -> Tensor:
        """The conv on ``(B, N, C)`` tokens filling ``grid`` in raster order -> ``(B, N, C)``.

        On the CPU (eager, float32/64) it runs in the fused extension's token-major kernel
        (:func:`ssl_med.ops.selective_scan_fused.grid_conv_fused`): PyTorch's depthwise conv backward
        costs milliseconds on the few-token grids of small crops; elsewhere ``nn.Conv2d/3d``.
        """
        if selective_scan_fused.grid_conv_applies(x, self.conv.weight, self.conv.bias):
            return selective_scan_fused.grid_conv_fused(x, self.conv.weight, self.conv.bias, grid)
        b, _, c = x.shape
        return self.conv(x.transpose(1, 2).reshape(b, c, *grid)).flatten(2).transpose(1, 2)


def small_init_(weight: Tensor, dim: int) -> Tensor:
    """Normal init with ``std = sqrt(2 / (5 dim))`` (xLSTM's ``small_init``)."""
    return nn.init.normal_(weight, mean=0.0, std=math.sqrt(2.0 / (5.0 * dim)))


def wang_init_(weight: Tensor, dim: int, num_blocks: int) -> Tensor:
    """Normal init with ``std = 2 / num_blocks / sqrt(dim)`` (xLSTM's ``wang_init``)."""
    return nn.init.normal_(weight, mean=0.0, std=2.0 / num_blocks / math.sqrt(dim))
