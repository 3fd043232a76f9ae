"""Pre-norm transformer block shared by the ViT backbones and the objectives' decoders."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from timm.layers import DropPath, LayerScale, Mlp
from torch import Tensor, nn

from ssl_med.layers.attention import Attention, AttnImpl


class Block(nn.Module):
    """Pre-norm transformer block: ``x + ls1(attn(norm1(x)))``, ``x + ls2(mlp(norm2(x)))``.

    Shapes: ``(B, L, D) -> (B, L, D)``; ``key_padding_mask`` ``(B, L)`` (True = padding) or ``seqlens``
    (packed ``(1, T, D)`` input) are passed to the attention, see :mod:`ssl_med.layers.attention`.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path: float = 0.0,
        init_values: float | None = None,
        attn_impl: AttnImpl = "auto",
    ) -> None:
        super().__init__()
        norm = partial(nn.LayerNorm, eps=1e-6)
        self.norm1 = norm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=qkv_bias, attn_impl=attn_impl)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path1 = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.drop_path2 = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(
        self, x: Tensor, key_padding_mask: Tensor | None = None, seqlens: Sequence[int] | None = None
    ) -> Tensor:
        x = x + self._drop_path(
            self.drop_path1, self.ls1(self.attn(self.norm1(x), key_padding_mask, seqlens)), seqlens
        )
        return x + self._drop_path(self.drop_path2, self.ls2(self.mlp(self.norm2(x))), seqlens)

    def _drop_path(self, drop: nn.Module, branch: Tensor, seqlens: Sequence[int] | None) -> Tensor:
        """Stochastic depth per sample; in a packed sequence per segment (= per original image)."""
        if seqlens is None or not isinstance(drop, DropPath) or not self.training:
            return drop(branch)
        keep = 1.0 - drop.drop_prob
        sample = branch.new_empty(len(seqlens)).bernoulli_(keep).div_(keep)
        per_token = torch.repeat_interleave(sample, torch.as_tensor(list(seqlens), device=branch.device))
        return branch * per_token[None, :, None]
