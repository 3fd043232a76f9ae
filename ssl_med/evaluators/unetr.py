"""UNETR-style decoder over any token encoder's intermediate layers (2D and 3D).

For a patch size ``P = 2**k`` the encoder's token grid sits at stride ``P``. ``k - 1`` hidden states
(shallow -> deep) become skip connections at strides ``P/2**(k-1) ... P/2`` (the shallowest is
upsampled most, as in UNETR where blocks 3/6/9 of a ViT-B/16 feed strides 2/4/8), the final normed
patch tokens are the bottleneck at stride ``P``, and a convolutional stem on the input is the
full-resolution skip. Built from MONAI's ``UnetrBasicBlock``/``UnetrPrUpBlock``/``UnetrUpBlock``/
``UnetOutBlock``; channels at stride ``s`` are ``feature_size * s``.

Shapes: ``x`` ``(B, C, *S)`` -> logits ``(B, num_classes, *S)``, with every axis of ``S`` a multiple of ``P``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from monai.networks.blocks import UnetOutBlock, UnetrBasicBlock, UnetrPrUpBlock, UnetrUpBlock
from torch import Tensor, nn

from ssl_med.encoder import Encoder


def default_layers(depth: int, k: int) -> list[int]:
    """``k - 1`` evenly spaced skip blocks (0-based), e.g. depth 12, ``k = 4`` -> ``[2, 5, 8]``."""
    return [round(depth * (i + 1) / k) - 1 for i in range(k - 1)]


def tokens_to_map(tokens: Tensor, grid: Sequence[int]) -> Tensor:
    """``(B, N, D)`` raster-ordered tokens -> ``(B, D, *grid)``."""
    b, n, d = tokens.shape
    if n != math.prod(grid):
        raise ValueError(f"{n} tokens do not fill grid {tuple(grid)}")
    return tokens.transpose(1, 2).reshape(b, d, *grid)


class UnetrSegmenter(nn.Module):
    """Encoder + UNETR decoder.

    Args:
        encoder: an :class:`~ssl_med.encoder.Encoder` with an isotropic power-of-two patch size.
        num_classes: output channels (background included).
        feature_size: decoder width at full resolution (MONAI UNETR: 16).
        layers: ``k - 1`` encoder blocks used as skips (shallow -> deep); ``None``: evenly spaced.
        frozen: run the encoder under ``torch.no_grad`` in eval mode (decoder-only training).
        norm_name: MONAI norm for the decoder blocks.
    """

    def __init__(
        self,
        encoder: Encoder,
        num_classes: int,
        feature_size: int = 16,
        layers: Sequence[int] | None = None,
        frozen: bool = True,
        norm_name: str = "instance",
    ) -> None:
        super().__init__()
        patch = set(encoder.patch_size)
        if len(patch) != 1 or (p := patch.pop()) < 2 or p & (p - 1):
            raise ValueError(
                f"UNETR decoder needs an isotropic power-of-two patch size, got {encoder.patch_size}"
            )
        if encoder.in_chans is None:
            raise ValueError("UNETR decoder needs an encoder with a fixed number of input channels")
        dims, d, f = encoder.spatial_dims, encoder.embed_dim, feature_size
        k = int(math.log2(p))
        self.encoder, self.frozen, self.k = encoder, frozen, k
        self.layers = list(layers) if layers is not None else default_layers(encoder.depth, k)
        if len(self.layers) != k - 1:
            raise ValueError(f"patch {p} needs {k - 1} skip layers, got {self.layers}")
        self.stem = UnetrBasicBlock(dims, encoder.in_chans, f, 3, 1, norm_name, res_block=True)
        self.skips = nn.ModuleList(
            UnetrPrUpBlock(dims, d, f * 2 ** (i + 1), k - 2 - i, 3, 1, 2, norm_name, res_block=True)
            for i in range(k - 1)
        )
        ups, channels = [], d
        for i in reversed(range(k - 1)):
            ups.append(UnetrUpBlock(dims, channels, f * 2 ** (i + 1), 3, 2, norm_name, res_block=True))
            channels = f * 2 ** (i + 1)
        ups.append(UnetrUpBlock(dims, channels, f, 3, 2, norm_name, res_block=True))
        self.ups = nn.ModuleList(ups)
        self.out = UnetOutBlock(dims, f, num_classes)
        if frozen:
            encoder.requires_grad_(False)

    def train(self, mode: bool = True) -> UnetrSegmenter:
        super().train(mode)
        if self.frozen:
            self.encoder.eval()
        return self

    def encode(self, x: Tensor) -> tuple[list[Tensor], Tensor]:
        """Skip maps ``[(B, D, *grid)] * (k - 1)`` (shallow -> deep) and the bottleneck ``(B, D, *grid)``."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            out = self.encoder(x, return_layers=self.layers)
        return [tokens_to_map(h, out.grid) for h in out.hidden_states], tokens_to_map(
            out.patch_tokens, out.grid
        )

    def forward(self, x: Tensor) -> Tensor:
        """``(B, C, *S)`` -> logits ``(B, num_classes, *S)``."""
        hidden, y = self.encode(x)
        skips = [block(h) for block, h in zip(self.skips, hidden)]
        for i, up in zip(reversed(range(self.k - 1)), self.ups):
            y = up(y, skips[i])
        y = self.ups[-1](y, self.stem(x))
        return self.out(y)
