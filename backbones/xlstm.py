"""Vision-LSTM (ViL) with mLSTM blocks for 2D and 3D inputs (``backbone=xlstm``).

Follows NX-AI/vision-lstm (``vision_lstm2.py`` = ViL v2, the default; ``vision_lstm.py`` = v1; Alkin et
al., "Vision-LSTM", ICLR 2025). One block (:class:`ViLBlock`), tokens ``(B, L, D)``::

    x = x + DropPath(flip(ViLLayer(flip(LN(x)))))            flip only in odd (backward) blocks
    ViLLayer: x_m, z = split(proj_up(x))                       D -> 2 * inner, inner = 2 D
              c = SiLU(conv(x_m))                              v2: depthwise 3x3 (2D) / 3x3x3 (3D) over the
                                                               token grid; v1: causal depthwise 1D, kernel 4
              q, k = blockdiag(c), v = blockdiag(x_m)          4x4 blocks, (B, L, inner) each
              h = MHNorm(mLSTM(q, k, v; i~, f~ = Linear(cat(q, k, v))))   NH = 4 heads, DH = inner / 4
              out = proj_down((h + skip * c) * SiLU(z))        inner -> D

The model: patch embedding (2D/3D conv) -> learned position embedding -> blocks (even indices scan
the raster order forwards, odd ones backwards) -> final LayerNorm; no CLS token; the pooled embedding
is the mean of the first and the last token (ViL's ``bilateral_avg``). 3D token grids are flattened
in raster order (last axis fastest), as 2D ones.

Deviations from the reference (each deliberate):

* ``depth`` counts single (one-direction) blocks, so ``return_layers`` and drop-path see each block;
  ViL v2's ``depth=12`` block *pairs* is ``depth=24`` here (the sizes below already use 24).
* Pooling is ``bilateral_avg`` (a ``(B, D)`` embedding as the encoder interface requires) also for v2,
  whose classifier concatenates the two tokens (``bilateral_flatten``, ``(B, 2D)``).
* 3D is an extension: the v2 conv becomes a depthwise 3x3x3 ``Conv3d`` over the token grid; in the
  backward blocks it sees the flipped sequence reshaped to the grid (all axes reversed), the exact
  analogue of the 2D reference's 180-degree rotation.
* Visible-only forward (``keep_idx``, MAE): the mLSTM runs over the kept tokens in their order; the
  v2 grid conv scatters the kept tokens into a zero grid at their positions, convolves, and gathers
  them back, so a kept token sees its kept neighbours and zeros in place of dropped ones (as at the
  image border); dropped content never reaches kept tokens. The v1 causal conv runs over the kept
  sequence as it is.
* With ``init_weights="original-fixed"`` the down-projection's Wang init uses ``num_blocks=depth``
  (the reference's fix uses ``2 * depth`` because its depth counts pairs: the same number).
* Under autocast the mLSTM cell runs in float32 (xLSTM-UNet does the same for the whole layer): the
  stabilised exponentials lose too much in bf16/fp16.
* ``mlstm_impl`` chooses the parallel (reference) or chunkwise (linear-memory) form of the same cell.

Parameter names follow the reference (``blocks.i.norm``, ``blocks.i.layer.{proj_up, conv, q_proj,
k_proj, v_proj, mlstm_cell.{igate, fgate, outnorm}, learnable_skip, proj_down}``); norms store the
*residual* weight ``w`` (effective scale ``1 + w``) as the reference does. Hub checkpoints would need the
reference's key renames, pairs unrolled to single blocks, and ``patch_embed.proj``/``pos_embed`` names.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from torch import Tensor, nn

from ssl_med.encoder import TokenEncoder, TokenLayout, size_preset
from ssl_med.layers.vil import (
    CausalConv1d,
    GridConv,
    LinearHeadwise,
    MultiHeadLayerNorm,
    ResidualLayerNorm,
    small_init_,
    wang_init_,
)
from ssl_med.ops.mlstm import MLSTMImpl, mlstm
from ssl_med.registry import BACKBONES

#: (embed_dim, depth in single blocks) per size; v2 hub ``vil2-{tiny,small,base}`` (12 pairs = 24 blocks),
#: v1 hub ``vil-{tiny,small,base}`` (24 single blocks).
XLSTM_SIZES: dict[str, tuple[int, int]] = {
    "tiny": (192, 24),
    "small": (384, 24),
    "base": (768, 24),
}

ConvKind = Literal["grid", "causal1d"]


class MLSTMCell(nn.Module):
    """Multi-head mLSTM with gates from ``cat(q, k, v)`` and a per-head output norm (ViL ``MatrixLSTMCell``).

    Args:
        dim: inner width ``NH * DH``.
        num_heads: NH (ViL: 4).
        norm_bias: bias in the output norm.
        impl, chunk_size, parallel_max_len: which form of :func:`ssl_med.ops.mlstm.mlstm` runs.

    Shapes: ``q, k, v (B, L, dim) -> (B, L, dim)``; gate pre-activations ``(B, NH, L)``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 4,
        norm_bias: bool = True,
        impl: MLSTMImpl = "auto",
        chunk_size: int = 64,
        parallel_max_len: int | None = None,
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"inner width {dim} is not a multiple of the {num_heads} mLSTM heads")
        self.dim, self.num_heads = dim, num_heads
        self.impl, self.chunk_size, self.parallel_max_len = impl, chunk_size, parallel_max_len
        self.igate = nn.Linear(3 * dim, num_heads)
        self.fgate = nn.Linear(3 * dim, num_heads)
        self.outnorm = MultiHeadLayerNorm(dim, bias=norm_bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.fgate.weight)
        with torch.no_grad():
            self.fgate.bias.copy_(torch.linspace(3.0, 6.0, self.num_heads))
        nn.init.zeros_(self.igate.weight)
        nn.init.normal_(self.igate.bias, mean=0.0, std=0.1)

    def gate_preacts(self, gate_in: Tensor) -> tuple[Tensor, Tensor]:
        """Input and forget gate pre-activations ``(B, NH, L)`` each from ``cat(q, k, v) (B, L, 3 dim)``.

        Both gates run as one ``3 dim -> 2 NH`` matmul on their stacked weights: the gate input is read
        once instead of twice, and its gradient is one product instead of two summed (the gate input
        is as wide as q, k and v together, so these passes are not negligible next to the mLSTM).
        """
        dtype = gate_in.dtype
        weight = torch.cat([self.igate.weight, self.fgate.weight]).to(dtype)
        bias = torch.cat([self.igate.bias, self.fgate.bias]).to(dtype)
        i_pre, f_pre = F.linear(gate_in, weight, bias).transpose(1, 2).split(self.num_heads, dim=1)
        return i_pre, f_pre

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        b, length, _ = q.shape
        out_dtype = q.dtype
        dtype = torch.float32 if q.dtype in (torch.float16, torch.bfloat16) else q.dtype
        with torch.autocast(device_type=q.device.type, enabled=False):
            q, k, v = q.to(dtype), k.to(dtype), v.to(dtype)
            i_pre, f_pre = self.gate_preacts(torch.cat([q, k, v], dim=-1))
            q, k, v = (t.view(b, length, self.num_heads, -1).transpose(1, 2) for t in (q, k, v))
            h = mlstm(
                q,
                k,
                v,
                i_pre,
                f_pre,
                impl=self.impl,
                chunk_size=self.chunk_size,
                parallel_max_len=self.parallel_max_len,
            )  # (B, NH, L, DH)
            h = self.outnorm(h)
        return h.transpose(1, 2).reshape(b, length, self.dim).to(out_dtype)


class ViLLayer(nn.Module):
    """The mLSTM branch of a ViL block (no norm, no residual); see the module docstring.

    Args:
        dim: token width D.
        spatial_dims: 2 or 3 (for the grid conv).
        conv_kind: ``"grid"`` (v2) or ``"causal1d"`` (v1).
        conv_kernel_size: 3 for ``grid``, 4 for ``causal1d`` in the reference.
        expansion: inner width / D.
        qkv_block_size: block size of the block-diagonal q/k/v projections.
        num_heads: mLSTM heads (the reference reuses ``qkv_block_size``, i.e. 4).
        proj_bias, norm_bias, conv_bias: biases of the projections, the output norm and the conv.
        num_init_blocks: ``num_blocks`` of the down-projection's Wang init.
        impl, chunk_size, parallel_max_len: the mLSTM form.

    Shapes: ``(B, L, D) -> (B, L, D)``.
    """

    def __init__(
        self,
        dim: int,
        spatial_dims: int = 2,
        conv_kind: ConvKind = "grid",
        conv_kernel_size: int = 3,
        expansion: int = 2,
        qkv_block_size: int = 4,
        num_heads: int = 4,
        proj_bias: bool = True,
        norm_bias: bool = True,
        conv_bias: bool = True,
        num_init_blocks: int = 1,
        impl: MLSTMImpl = "auto",
        chunk_size: int = 64,
        parallel_max_len: int | None = None,
    ) -> None:
        super().__init__()
        inner = expansion * dim
        self.dim, self.inner, self.num_init_blocks = dim, inner, num_init_blocks
        self.proj_up = nn.Linear(dim, 2 * inner, bias=proj_bias)
        self.q_proj = LinearHeadwise(inner, qkv_block_size, bias=proj_bias)
        self.k_proj = LinearHeadwise(inner, qkv_block_size, bias=proj_bias)
        self.v_proj = LinearHeadwise(inner, qkv_block_size, bias=proj_bias)
        if conv_kind == "grid":
            self.conv: nn.Module = GridConv(spatial_dims, inner, conv_kernel_size, bias=conv_bias)
        elif conv_kind == "causal1d":
            self.conv = CausalConv1d(inner, conv_kernel_size, bias=conv_bias)
        else:
            raise ValueError(f"conv_kind must be 'grid' or 'causal1d', got {conv_kind!r}")
        self.mlstm_cell = MLSTMCell(inner, num_heads, norm_bias, impl, chunk_size, parallel_max_len)
        self.learnable_skip = nn.Parameter(torch.ones(inner))
        self.proj_down = nn.Linear(inner, dim, bias=proj_bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        small_init_(self.proj_up.weight, self.dim)
        wang_init_(self.proj_down.weight, self.dim, self.num_init_blocks)
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            small_init_(proj.weight, self.dim)  # the embedding dim, not the inner one (as the reference)
        for module in (self.proj_up, self.proj_down, self.q_proj, self.k_proj, self.v_proj):
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        nn.init.ones_(self.learnable_skip)
        self.mlstm_cell.reset_parameters()

    def forward(self, x: Tensor, grid: tuple[int, ...], positions: Tensor | None = None) -> Tensor:
        x_mlstm, z = self.proj_up(x).chunk(2, dim=-1)  # (B, L, inner) each
        x_conv = F.silu(self.conv(x_mlstm, grid, positions))
        q, k, v = self.q_proj(x_conv), self.k_proj(x_conv), self.v_proj(x_mlstm)
        h = self.mlstm_cell(q, k, v) + self.learnable_skip * x_conv
        return self.proj_down(h * F.silu(z))


class ViLBlock(nn.Module):
    """Pre-norm residual ViL block scanning forwards or (``reverse=True``) backwards.

    ``x + DropPath(flip(layer(flip(norm(x)))))``: the flip is inside the residual branch, after the
    norm, and undone before the residual add. ``layer_kwargs`` go to :class:`ViLLayer`.

    Shapes: ``(B, L, D) -> (B, L, D)``.
    """

    def __init__(
        self, dim: int, reverse: bool, drop_path: float = 0.0, norm_bias: bool = True, **layer_kwargs: object
    ) -> None:
        super().__init__()
        self.reverse = reverse
        self.norm = ResidualLayerNorm(dim, eps=1e-5, bias=norm_bias)
        self.layer = ViLLayer(dim, norm_bias=norm_bias, **layer_kwargs)  # type: ignore[arg-type]
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def flip(self, x: Tensor) -> Tensor:
        """Reverse the token axis in backward blocks (its own inverse); identity in forward ones."""
        return x.flip(1) if self.reverse else x

    def positions(self, layout: TokenLayout) -> Tensor | None:
        """Grid positions ``(B, L)`` of the (flipped) sequence for the grid conv, ``None`` for the full grid.

        A flipped full sequence reshaped to the grid is the grid with every axis reversed, so the kept
        token at original raster index ``p`` sits at ``N - 1 - p`` there.
        """
        if layout.keep_idx is None:
            return None
        if not self.reverse:
            return layout.keep_idx
        return (layout.num_patches - 1) - layout.keep_idx.flip(1)

    def forward(self, x: Tensor, layout: TokenLayout) -> Tensor:
        branch = self.flip(self.layer(self.flip(self.norm(x)), layout.grid, self.positions(layout)))
        return x + self.drop_path(branch)


@BACKBONES.register("xlstm")
class VisionLSTM(TokenEncoder):
    """Vision-LSTM encoder (ViL v2 by default, v1 optional), 2D or 3D.

    Args:
        spatial_dims: 2 or 3.
        in_chans: input channels.
        img_size: input size the learned position table is made for; other multiples of the patch
            are interpolated.
        patch_size: int or one per axis.
        size: ``tiny|small|base`` (D = 192/384/768, 24 single blocks); explicit ``embed_dim``/``depth``
            override it.
        embed_dim: token width D (``expansion * D`` must be a multiple of ``qkv_block_size`` and
            ``num_heads``).
        depth: number of single blocks (even ones forward, odd ones backward).
        version: ``"v2"`` (grid conv k3, biases) or ``"v1"`` (causal 1D conv k4, no projection/norm
            biases); ``conv_kind``/``conv_kernel_size``/``proj_bias``/``norm_bias`` override its defaults.
        conv_kind: ``"grid"`` (depthwise conv on the 2D/3D token grid) or ``"causal1d"``.
        conv_kernel_size: conv kernel (odd for ``grid``).
        expansion: inner width / D (2).
        qkv_block_size: block size of the block-diagonal q/k/v projections (4).
        num_heads: mLSTM heads (4; DH = expansion * D / 4).
        proj_bias, norm_bias: biases in projections / norms.
        drop_path_rate: stochastic depth, the same for every block (``drop_path_decay=False``, as the
            reference) or increasing linearly from 0 to it.
        drop_path_decay: see above.
        init_weights: ``"original"`` (Wang init with ``num_blocks=1``, reference default) or
            ``"original-fixed"`` (``num_blocks=depth``).
        mlstm_impl: ``auto`` (parallel up to ``parallel_max_len`` tokens, chunkwise beyond),
            ``parallel``, ``chunkwise`` or ``recurrent`` (slow; tests).
        chunk_size: chunk length of the chunkwise form.
        parallel_max_len: longest sequence ``auto`` runs in parallel form; ``None``: where the two
            forms cost the same, ``max(chunk_size, 2 * head width)`` (:func:`ssl_med.ops.mlstm.auto_parallel_max_len`).
        pos_embed: ``learned`` (reference) or ``sincos``.
    """

    block_classes = (ViLBlock,)  # FSDP's per-block unit (Encoder.block_classes)

    def __init__(
        self,
        spatial_dims: int = 2,
        in_chans: int = 1,
        img_size: int | Sequence[int] = 224,
        patch_size: int | Sequence[int] = 16,
        size: Literal["tiny", "small", "base"] = "tiny",
        embed_dim: int | None = None,
        depth: int | None = None,
        version: Literal["v1", "v2"] = "v2",
        conv_kind: ConvKind | None = None,
        conv_kernel_size: int | None = None,
        expansion: int = 2,
        qkv_block_size: int = 4,
        num_heads: int = 4,
        proj_bias: bool | None = None,
        norm_bias: bool | None = None,
        drop_path_rate: float = 0.0,
        drop_path_decay: bool = False,
        init_weights: Literal["original", "original-fixed"] = "original",
        mlstm_impl: MLSTMImpl = "auto",
        chunk_size: int = 64,
        parallel_max_len: int | None = None,
        pos_embed: Literal["learned", "sincos"] = "learned",
    ) -> None:
        if version not in ("v1", "v2"):
            raise ValueError(f"version must be 'v1' or 'v2', got {version!r}")
        if init_weights not in ("original", "original-fixed"):
            raise ValueError(f"init_weights must be 'original' or 'original-fixed', got {init_weights!r}")
        embed_dim, depth = size_preset("xLSTM", XLSTM_SIZES, size, embed_dim, depth)
        v2 = version == "v2"
        conv_kind = conv_kind or ("grid" if v2 else "causal1d")
        conv_kernel_size = conv_kernel_size or (3 if conv_kind == "grid" else 4)
        proj_bias = v2 if proj_bias is None else proj_bias
        norm_bias = v2 if norm_bias is None else norm_bias
        super().__init__(
            spatial_dims=spatial_dims,
            in_chans=in_chans,
            patch_size=patch_size,
            embed_dim=embed_dim,
            depth=depth,
            img_size=img_size,
            pos_embed=pos_embed,
            class_token=False,
            pooling="first_last",
            norm_layer=partial(ResidualLayerNorm, eps=1e-6, bias=norm_bias),
        )
        self.version, self.conv_kind = version, conv_kind
        rates = (
            [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
            if drop_path_decay
            else [drop_path_rate] * depth
        )
        self.blocks = nn.ModuleList(
            ViLBlock(
                embed_dim,
                reverse=i % 2 == 1,
                drop_path=rates[i],
                norm_bias=norm_bias,
                spatial_dims=spatial_dims,
                conv_kind=conv_kind,
                conv_kernel_size=conv_kernel_size,
                expansion=expansion,
                qkv_block_size=qkv_block_size,
                num_heads=num_heads,
                proj_bias=proj_bias,
                num_init_blocks=depth if init_weights == "original-fixed" else 1,
                impl=mlstm_impl,
                chunk_size=chunk_size,
                parallel_max_len=parallel_max_len,
            )
            for i in range(depth)
        )
        proj = self.patch_embed.proj
        nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
        if proj.bias is not None:
            nn.init.zeros_(proj.bias)

    def set_mlstm_impl(
        self, impl: MLSTMImpl, chunk_size: int | None = None, parallel_max_len: int | None = None
    ) -> None:
        """Switch every block's mLSTM form (the weights are shared by all forms)."""
        for block in self.blocks:
            cell = block.layer.mlstm_cell
            cell.impl = impl
            cell.chunk_size = chunk_size or cell.chunk_size
            cell.parallel_max_len = parallel_max_len or cell.parallel_max_len

    def run_block(self, index: int, x: Tensor, layout: TokenLayout) -> Tensor:
        """Block ``index`` on ``(B, L, D)``; the layout gives the grid and kept positions to the conv."""
        return self.blocks[index](x, layout)
