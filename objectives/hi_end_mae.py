"""Hi-End-MAE: encoder-driven hierarchical dense decoding (Tang et al., MedIA 2025), 2D and 3D (``objective=hi_end_mae``).

Formula (``FengheTan9/Hi-End-MAE``, ``hi_end_mae.py`` + ``networks/vit.py``; spec section 4): MAE random
masking (ratio 0.75) and a visible-only encoder forward that also returns the raw (pre-final-norm)
hidden states after the blocks at 1/4, 2/4 and 3/4 depth (indices ``depth * k // 4`` for k = 1, 2, 3:
3, 6, 9 for depth 12, as the reference). Each level gets its own linear projection to the decoder
width:

* final level (the query stream): projection of the final-normed visible tokens, learned mask tokens at
  the masked positions, plus fixed sin-cos decoder positions;
* intermediate levels: projections of the visible tokens only (keys/values, no positions).

The decoder runs ``decoder_self_depth`` (2) self-attention blocks on the query stream, then one
cross-attention block per intermediate level, deep to shallow (level 9, then 6, then 3); a cross block
is pre-LN self-attention -> pre-LN cross-attention (queries from the decoder stream, keys/values from
the projected level, not normalised) -> pre-LN MLP, all residual. LayerNorm -> linear to patch pixels.
Loss: MSE over masked patches against per-patch LayerNorm targets (biased variance, eps 1e-6 in the
square root) with ``norm_pix_loss``, raw patches otherwise. Linear layers are Xavier-uniform.

Defaults from the reference: mask ratio 0.75; decoder width 384 with 12 heads (the ViT-B/16 pairing;
ViT-L/12 uses 528 / 16); 2 self + 3 cross blocks; 96^3 crops with patch 16 (or 12) in 3D. View
augmentation as the reference data loader: random flips per axis (p 0.5), random 90-degree rotation
(p 0.3), intensity scaling and shifting by +-0.1 (p 0.1 each).

Deviations from the reference, on purpose (MAE's, see :mod:`objectives.mae`):
    * kept tokens stay in raster order (sequence backbones see them in scan order) and the decoder
      scatters them back to their positions, instead of working in shuffled order;
    * decoder and levels carry patch tokens only (the reference also carries the encoder's CLS token
      through every level, where the loss never uses it);
    * the 2D variant uses the same code with 2D patches and the 2D sin-cos table;
    * the random 90-degree rotation is applied in the first two spatial axes only when the crop is
      square in them (otherwise the sample would no longer collate);
    * with an encoder shallower than 4 blocks the default levels repeat (e.g. depth 2 -> 0, 1, 1).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import Tensor, nn

from objectives.losses.precision import upcast
from objectives.mae import MAE, MAEDecoder, masked_patch_loss, random_masking
from objectives.views import ReseededViews, plain_image
from ssl_med.data.channels import encoder_channel_kwargs
from ssl_med.encoder import Encoder
from ssl_med.layers.attention import Attention, AttnImpl, attention
from ssl_med.layers.patch_embed import patchify
from ssl_med.objective import ObjectiveOutput, Sample
from ssl_med.registry import OBJECTIVES


def default_levels(depth: int) -> tuple[int, ...]:
    """Block indices at 1/4, 2/4 and 3/4 depth (0-based): ``(3, 6, 9)`` for depth 12."""
    return tuple(depth * k // 4 for k in (1, 2, 3))


def hi_end_mae_loss(pred: Tensor, patches: Tensor, mask: Tensor, norm_pix: bool = True) -> Tensor:
    """Hi-End-MAE loss: MSE over masked patches; targets per-patch LayerNorm'ed (biased var) if ``norm_pix``.

    Shapes: ``pred``, ``patches`` ``(B, N, P)``; ``mask`` ``(B, N)`` bool (True = masked) -> scalar.
    """
    # float32 targets whatever the images' dtype (layer_norm keeps its input's), as masked_patch_loss
    patches = upcast(patches)
    target = F.layer_norm(patches, patches.shape[-1:], eps=1e-6) if norm_pix else patches
    return masked_patch_loss(pred, target, mask, norm_pix=False)


class CrossAttention(nn.Module):
    """Multi-head cross-attention: queries from ``x (B, L, D)``, keys/values from ``y (B, M, D)`` -> ``(B, L, D)``."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, attn_impl: AttnImpl = "auto") -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.attn_impl = attn_impl
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        b, n, d = x.shape
        h = self.num_heads
        q = self.q(x).reshape(b, n, h, d // h).transpose(1, 2)
        kv = self.kv(y).reshape(b, y.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4)
        out = attention(q, kv[0], kv[1], impl=self.attn_impl)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class CrossAttentionBlock(nn.Module):
    """``x + SA(LN(x))``, ``x + CA(LN(x), y)``, ``x + MLP(LN(x))``. Shapes: ``x (B, L, D)``, ``y (B, M, D)`` -> ``(B, L, D)``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, attn_impl: AttnImpl = "auto") -> None:
        super().__init__()
        self.norm0 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attn = Attention(dim, num_heads, qkv_bias=True, attn_impl=attn_impl)
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.cross_attn = CrossAttention(dim, num_heads, qkv_bias=True, attn_impl=attn_impl)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), act_layer=nn.GELU)

    def forward(self, x: Tensor, y: Tensor) -> Tensor:
        x = x + self.self_attn(self.norm0(x))
        x = x + self.cross_attn(self.norm1(x), y)
        return x + self.mlp(self.norm2(x))


class HiEndDecoder(MAEDecoder):
    """Hierarchical dense decoder: MAE's query stream + self-attention blocks, then cross-attention to levels.

    Inherits from :class:`~objectives.mae.MAEDecoder` its final-level projection ``embed``, the
    ``mask_token``, the self-attention ``blocks``, ``norm`` and ``pred``; adds one projection
    (``level_embed``) and one :class:`CrossAttentionBlock` per intermediate level.

    Shapes: ``forward(final (B, N_keep, D_enc), levels [(B, N_keep, D_enc)] deep -> shallow,
    keep_idx (B, N_keep), grid)`` -> ``(B, N, P)`` predictions for every patch.
    """

    def __init__(
        self,
        embed_dim: int,
        decoder_dim: int,
        self_depth: int,
        num_heads: int,
        patch_dim: int,
        num_levels: int,
    ) -> None:
        super().__init__(embed_dim, decoder_dim, self_depth, num_heads, patch_dim)
        self.level_embed = nn.ModuleList(nn.Linear(embed_dim, decoder_dim) for _ in range(num_levels))
        self.cross_blocks = nn.ModuleList(CrossAttentionBlock(decoder_dim, num_heads) for _ in range(num_levels))
        self.apply(_xavier_init)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(  # type: ignore[override]
        self, final: Tensor, levels: Sequence[Tensor], keep_idx: Tensor, grid: tuple[int, ...]
    ) -> Tensor:
        if len(levels) != len(self.cross_blocks):
            raise ValueError(f"expected {len(self.cross_blocks)} encoder levels, got {len(levels)}")
        x = self.query_stream(final, keep_idx, grid)
        for block in self.blocks:
            x = block(x)
        for proj, block, level in zip(self.level_embed, self.cross_blocks, levels):
            x = block(x, proj(level))
        return self.pred(self.norm(x))


def _xavier_init(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.xavier_uniform_(module.weight)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)


class HiEndMAEViews(ReseededViews):
    """Per-sample augmentation of the reference loader: ``{"image": (C, *S)}`` -> same keys, same shape.

    Flips on every spatial axis (``flip_prob`` each), intensity scaling by ``1 + U(-intensity_scale,
    intensity_scale)`` and shifting by ``U(-intensity_shift, intensity_shift)`` (``intensity_prob``
    each), then a rotation by ``k * 90`` degrees, ``k`` uniform in ``{1, 2, 3}``, in the first two
    spatial axes when they are equal (``rotate90_prob``). All draws come from one call to the
    generator, the pixel work is plain torch ops. Seeding: see :class:`~objectives.views.ReseededViews`.
    """

    def __init__(
        self,
        spatial_dims: int,
        flip_prob: float = 0.5,
        rotate90_prob: float = 0.3,
        intensity_scale: float = 0.1,
        intensity_shift: float = 0.1,
        intensity_prob: float = 0.1,
    ) -> None:
        self.spatial_dims = spatial_dims
        self.flip_prob = flip_prob
        self.rotate90_prob = rotate90_prob
        self.intensity_scale = intensity_scale
        self.intensity_shift = intensity_shift
        self.intensity_prob = intensity_prob

    def __call__(self, sample: Sample) -> Sample:
        nd = self.spatial_dims
        u = self.rng().random_sample(nd + 6).tolist()
        image = plain_image(sample)
        flips = [1 + a for a in range(nd) if u[a] < self.flip_prob]
        if flips:
            image = torch.flip(image, flips)
        scale, shift, rotate = u[nd : nd + 2], u[nd + 2 : nd + 4], u[nd + 4 :]
        if scale[0] < self.intensity_prob:
            image = image * (1 + self.intensity_scale * (2 * scale[1] - 1))
        if shift[0] < self.intensity_prob:
            image = image + self.intensity_shift * (2 * shift[1] - 1)
        if rotate[0] < self.rotate90_prob and image.shape[1] == image.shape[2]:
            image = torch.rot90(image, 1 + int(3 * rotate[1]), dims=(1, 2))
        return {**sample, "image": image.contiguous()}


@OBJECTIVES.register("hi_end_mae")
class HiEndMAE(MAE):
    """Hi-End-MAE objective (see the module docstring); previews as :class:`~objectives.mae.MAE`.

    Args:
        encoder: any :class:`~ssl_med.encoder.Encoder` (``keep_idx`` and ``return_layers`` are used).
        mask_ratio: fraction of tokens removed (0.75).
        norm_pix_loss: per-patch LayerNorm targets (True).
        decoder_dim, decoder_heads: decoder width and heads (reference ViT-B/16 pairing: 384, 12).
        decoder_self_depth: self-attention blocks before the cross-attention blocks (2).
        levels: encoder block indices whose hidden states are decoded, any order (consumed deep to
            shallow); default 1/4, 2/4, 3/4 depth.
        views: keyword arguments of :class:`HiEndMAEViews` (``flip_prob``, ``rotate90_prob``,
            ``intensity_scale``, ``intensity_shift``, ``intensity_prob``; defaults 0.5, 0.3, 0.1, 0.1,
            0.1); on the command line ``objective.views.rotate90_prob=0``.
        in_chans: channels to reconstruct for channel-adaptive encoders (see :class:`~objectives.mae.MAE`).
    """

    def __init__(
        self,
        encoder: Encoder,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
        decoder_dim: int = 384,
        decoder_heads: int = 12,
        decoder_self_depth: int = 2,
        levels: Sequence[int] | None = None,
        views: Mapping[str, Any] | None = None,
        in_chans: int | None = None,
    ) -> None:
        hi_end_views = HiEndMAEViews(encoder.spatial_dims, **(views or {}))
        # MAE's constructor validates and stores the shared options; its plain decoder is replaced below
        super().__init__(
            encoder, mask_ratio, norm_pix_loss, decoder_dim, 0, decoder_heads, hi_end_views.flip_prob, in_chans
        )
        self.views = hi_end_views
        levels = default_levels(encoder.depth) if levels is None else tuple(int(i) for i in levels)
        if not levels:
            raise ValueError("Hi-End-MAE needs at least one intermediate level")
        for i in levels:
            if not -encoder.depth <= i < encoder.depth:
                raise ValueError(f"level {i} out of range for an encoder of depth {encoder.depth}")
        # deep -> shallow
        self.levels = tuple(sorted(levels, key=lambda i: i % encoder.depth, reverse=True))
        patch_dim = math.prod(encoder.patch_size) * self.in_chans
        self.decoder = HiEndDecoder(
            encoder.embed_dim, decoder_dim, decoder_self_depth, decoder_heads, patch_dim, len(self.levels)
        )

    def view_transform(self) -> Callable[[Sample], Sample]:
        return self.views

    def _predict(
        self, images: Tensor, noise: Tensor | None, channels: Mapping[str, Any] | None = None
    ) -> tuple[Tensor, Tensor, Tensor, tuple[int, ...]]:
        """Masking, encoder and decoder: ``pred (B, N, P)``, ``mask (B, N)``, embedding ``(B, D)``, grid.
        ``channels``: the encoder's channel keywords (:func:`ssl_med.data.channels.encoder_channel_kwargs`).

        The embedding is the mean visible token (as MAE): the loss never touches the CLS token."""
        grid = self.encoder.grid_shape(images.shape[2:])
        if noise is None:
            noise = torch.rand(images.shape[0], math.prod(grid), device=images.device)
        keep_idx, mask = random_masking(noise, self.mask_ratio)
        out = self.encoder(images, keep_idx=keep_idx, return_layers=self.levels, **(channels or {}))
        pred = self.decoder(out.patch_tokens, out.hidden_states, keep_idx, grid)
        return pred, mask, out.patch_tokens.mean(dim=1), grid

    def forward(self, batch: dict[str, Any], noise: Tensor | None = None) -> ObjectiveOutput:
        """One step on ``batch["image"] (B, C, *S)``; ``noise`` ``(B, N)`` fixes the masking (tests)."""
        images = batch["image"]
        pred, mask, pooled, _ = self._predict(images, noise, encoder_channel_kwargs(self.encoder, batch))
        loss = hi_end_mae_loss(pred, patchify(images, self.encoder.patch_size), mask, self.norm_pix_loss)
        return ObjectiveOutput(loss=loss, terms={"hi_end_mae": loss.detach()}, embeddings=pooled.detach())

    @torch.no_grad()
    def preview(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        images = batch["image"]
        pred, mask, _, grid = self._predict(images, None)
        return {
            "input": images,
            "masked": self._masked_input(images, mask, grid),
            "reconstruction": self._reconstruct(pred, images, grid),
        }
