"""Vision Transformer for 2D and 3D inputs (``backbone=vit``).

Pre-norm transformer blocks (:class:`ssl_med.layers.transformer.Block`: timm's ``Mlp``, ``DropPath``,
``LayerScale`` around ssl_med's run-time attention kernel dispatch). Parameter names follow timm's
``VisionTransformer`` (``patch_embed.proj``, ``cls_token``, ``pos_embed`` with the CLS row,
``blocks.i.{norm1,attn.qkv,attn.proj,ls1,norm2,mlp.fc1,mlp.fc2,ls2}``, ``norm``).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Literal

from torch import nn

from ssl_med.encoder import TokenEncoder
from ssl_med.layers.attention import AttnImpl
from ssl_med.layers.transformer import Block
from ssl_med.registry import BACKBONES

#: (embed_dim, depth, num_heads) per size, as timm.
VIT_SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}


@BACKBONES.register("vit")
class VisionTransformer(TokenEncoder):
    """ViT encoder, 2D or 3D.

    Args:
        spatial_dims: 2 or 3.
        in_chans: input channels.
        img_size: input size the learned position table is made for; other multiples of the
            patch are interpolated.
        patch_size: int or one per axis.
        size: ``tiny|small|base|large`` (timm's widths); ``embed_dim``/``depth``/``num_heads`` given
            explicitly override it.
        mlp_ratio: MLP hidden width / D.
        qkv_bias: bias on the qkv projection.
        drop_path_rate: stochastic depth, linearly increasing over blocks.
        init_values: LayerScale init (``None``: no layer scale).
        pos_embed: ``learned`` or ``sincos``.
        class_token: use a CLS token (pooled embedding); else mean pooling.
        num_register_tokens: DINOv2-style registers.
        attn_impl: ``auto|sdpa|xformers|math``.
    """

    def __init__(
        self,
        spatial_dims: int = 2,
        in_chans: int = 1,
        img_size: int | Sequence[int] = 224,
        patch_size: int | Sequence[int] = 16,
        size: Literal["tiny", "small", "base", "large"] = "tiny",
        embed_dim: int | None = None,
        depth: int | None = None,
        num_heads: int | None = None,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        init_values: float | None = None,
        pos_embed: Literal["learned", "sincos"] = "learned",
        class_token: bool = True,
        num_register_tokens: int = 0,
        attn_impl: AttnImpl = "auto",
    ) -> None:
        if size not in VIT_SIZES:
            raise ValueError(f"unknown ViT size {size!r}; choose one of {sorted(VIT_SIZES)}")
        d, n, h = VIT_SIZES[size]
        embed_dim, depth, num_heads = embed_dim or d, depth or n, num_heads or h
        super().__init__(
            spatial_dims=spatial_dims,
            in_chans=in_chans,
            patch_size=patch_size,
            embed_dim=embed_dim,
            depth=depth,
            img_size=img_size,
            pos_embed=pos_embed,
            class_token=class_token,
            num_register_tokens=num_register_tokens,
            pos_embed_prefix=class_token,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
        )
        self.num_heads = num_heads
        rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio, qkv_bias, rates[i], init_values, attn_impl) for i in range(depth)
        )
        self.apply(_init_weights)


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
