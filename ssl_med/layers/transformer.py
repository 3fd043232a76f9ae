"""Pre-norm transformer block shared by the ViT backbones and the objectives' decoders."""

from __future__ import annotations

from functools import partial

from timm.layers import DropPath, LayerScale, Mlp
from torch import Tensor, nn

from ssl_med.layers.attention import Attention, AttnImpl


class Block(nn.Module):
    """Pre-norm transformer block: ``x + ls1(attn(norm1(x)))``, ``x + ls2(mlp(norm2(x)))``.

    Shapes: ``(B, L, D) -> (B, L, D)``.
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

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        x = x + self.drop_path1(self.ls1(self.attn(self.norm1(x), key_padding_mask)))
        return x + self.drop_path2(self.ls2(self.mlp(self.norm2(x))))
