"""Masked autoencoder (He et al., CVPR 2022), 2D and 3D, for any backbone (``objective=mae``).

Formula (``facebookresearch/mae``, ``models_mae.py``): per image, ``noise ~ U(0, 1)`` per token; the
``floor(N (1 - r))`` tokens of lowest noise are kept; the encoder sees only those (visible-only
forward); a light decoder gets the kept tokens back at their positions and a learned mask token
elsewhere, plus fixed sin-cos positions, and predicts each patch's pixels. With ``norm_pix_loss``
the target is per-patch normalised, ``(x - mean) / sqrt(var_unbiased + 1e-6)``. The loss is the
per-patch MSE averaged over masked patches only: ``sum_i e_i m_i / sum_i m_i``.

Deviations from the reference, on purpose:
    * kept indices are sorted (raster order) so that sequence backbones (Mamba, xLSTM) see the
      visible tokens in scan order; for attention this changes nothing;
    * the decoder receives patch tokens only (the reference also carries the encoder's CLS token
      through the decoder, where the loss never uses it);
    * 3D uses the same code with 3D patches and the 3D sin-cos table (Hi-End-MAE's MAE baseline);
    * the views are random flips on every spatial axis (the reference flips horizontally only); the
      reference's random resized crop (``RandomResizedCrop(scale=(0.2, 1.0))`` in ``main_pretrain.py``)
      is optional (``crop_scale``, off by default).

``encoder_input="mask_tokens"`` feeds the encoder the whole sequence with the masked patches replaced by the
encoder's learned mask token (SimMIM, Xie et al., CVPR 2022), and the decoder every encoded token. A scan
(Mamba, xLSTM) then reads the sequence it reads at evaluation, neighbours at their real distance, instead of
the visible quarter packed together; MambaMIM (Tang et al., 2024, arXiv 2408.08070) keeps the masked
positions in the sequence for this reason. The encoder then costs what an unmasked forward costs.

``target="hog"`` predicts each masked patch's histogram-of-oriented-gradients descriptor instead of its pixels
(MaskFeat, Wei et al., CVPR 2022; :mod:`objectives.losses.hog`): edges and shape without brightness and
contrast, averaged over cells. 2D only; ``norm_pix_loss`` applies to pixel targets alone (the descriptor is
normalised per patch already).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from objectives.losses.hog import default_cell_size, hog_dim, hog_targets
from objectives.losses.precision import upcast
from objectives.losses.uniformity import spectral_uniformity
from objectives.views import RandFlips, ReseededViews, draw_crops, plain_image, render_crops
from ssl_med.data.channels import encoder_channel_kwargs
from ssl_med.encoder import Encoder
from ssl_med.layers.patch_embed import grid_shape, patchify, unpatchify
from ssl_med.layers.pos_embed import sincos_pos_embed
from ssl_med.layers.transformer import Block
from ssl_med.objective import Objective, ObjectiveOutput, Sample
from ssl_med.registry import OBJECTIVES


def random_masking(noise: Tensor, mask_ratio: float) -> tuple[Tensor, Tensor]:
    """Choose visible tokens from per-token noise ``(B, N)``.

    Returns:
        keep_idx: ``(B, N_keep)`` visible token indices, ascending, ``N_keep = floor(N (1 - r))``.
        mask: ``(B, N)`` bool, True where a token is masked (removed).
    """
    b, n = noise.shape
    n_keep = int(n * (1 - mask_ratio))
    if not 0 < n_keep <= n:
        raise ValueError(f"mask_ratio={mask_ratio} keeps {n_keep} of {n} tokens; need at least one")
    keep_idx = noise.argsort(dim=1)[:, :n_keep].sort(dim=1).values
    mask = torch.ones(b, n, dtype=torch.bool, device=noise.device)
    mask.scatter_(1, keep_idx, False)
    return keep_idx, mask


def masked_patch_loss(pred: Tensor, target: Tensor, mask: Tensor, norm_pix: bool) -> Tensor:
    """MAE loss: per-patch MSE ``(B, N)`` averaged over masked patches (``mask`` True).

    ``pred``/``target``: ``(B, N, P)`` patch vectors. Computed in float32 (the decoder's prediction is
    bf16 under autocast; the squared errors and the per-patch target statistics need float32).
    """
    pred, target = upcast(pred), upcast(target)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)  # unbiased, as the reference
        target = (target - mean) / (var + 1.0e-6).sqrt()
    per_patch = (pred - target).pow(2).mean(dim=-1)
    m = mask.to(per_patch.dtype)
    return (per_patch * m).sum() / m.sum().clamp_min(1.0)


def reconstruction_channels(encoder: Encoder, in_chans: int | None) -> int:
    """Channels a pixel decoder predicts: the encoder's, or ``in_chans`` for channel-adaptive encoders."""
    if encoder.in_chans is not None:
        if in_chans is not None and in_chans != encoder.in_chans:
            raise ValueError(f"objective in_chans={in_chans} but the encoder takes {encoder.in_chans} channels")
        return encoder.in_chans
    if in_chans is None:
        raise ValueError(
            "a channel-adaptive encoder has no fixed channel count: set the objective's in_chans "
            "(e.g. data.num_channels) to the number of channels to reconstruct"
        )
    return in_chans


class MAEViews(ReseededViews):
    """``{"image": (C, *S)}`` -> the image flipped on each spatial axis with ``flip_prob`` (with
    ``crop_scale``: a random resized crop of it first), plus ``sample["mask_noise"]``, uniform noise
    ``(N,)`` per patch token, all drawn from one generator.

    The resized crop covers an area (volume) fraction in ``crop_scale`` with each side drawn on its own
    (:func:`~objectives.views.draw_crops`) and is scaled back to ``S`` (bilinear / trilinear), as MAE's
    ``RandomResizedCrop``; it interpolates, so it expects the ``[0, 1]`` crops a worker normalises
    (:attr:`MAE.geometric_views` is then False).

    Drawing the masking noise in the (per-sample seeded) view transform makes masks a function of the
    crop index: the same with any number of workers, and the same sample gets the same mask whether
    it is trained on one process or sharded across DDP ranks. Seeding: see
    :class:`~objectives.views.ReseededViews`.
    """

    def __init__(
        self,
        spatial_dims: int,
        patch_size: tuple[int, ...],
        flip_prob: float = 0.5,
        crop_scale: tuple[float, float] | None = None,
    ) -> None:
        self.flips = RandFlips(spatial_dims, flip_prob)
        self.patch_size = patch_size
        self.crop_scale = tuple(crop_scale) if crop_scale is not None else None

    def __call__(self, sample: Sample) -> Sample:
        rng = self.rng()
        sample = self.flips.apply(sample, rng) if self.crop_scale is None else self._resized_crop(sample, rng)
        n = math.prod(grid_shape(sample["image"].shape[1:], self.patch_size))
        return {**sample, "mask_noise": torch.from_numpy(rng.random_sample(n).astype(np.float32))}

    def _resized_crop(self, sample: Sample, rng: np.random.RandomState) -> Sample:
        image = plain_image(sample)
        if not image.is_floating_point():  # the data module normalises in the worker when geometric_views is False
            raise ValueError(
                f"objective.crop_scale: the resized crop expects crops normalised to [0, 1], got raw {image.dtype} "
                "values (data.normalise=worker or auto)"
            )
        shape = image.shape[1:]
        no_views = (0.0,)
        p = draw_crops(
            rng, shape, n=1, scale=self.crop_scale, flip_axes=self.flips.axes, flip_prob=self.flips.prob,
            jitter_prob=0.0, brightness=0.0, contrast=0.0, blur_prob=no_views, sigma_range=(0.0, 0.0),
            solarize_prob=no_views,
        )  # fmt: skip
        return {**sample, "image": render_crops(image.float(), p, shape)[0]}


class MAEDecoder(nn.Module):
    """Light transformer decoder: visible tokens + mask tokens at fixed sin-cos positions -> pixels.

    Shapes: visible ``(B, N_keep, D)`` with ``keep_idx (B, N_keep)`` -> ``(B, N, prod(p) * C)``.
    """

    def __init__(self, embed_dim: int, decoder_dim: int, depth: int, num_heads: int, patch_dim: int) -> None:
        super().__init__()
        self.decoder_dim = decoder_dim
        self.embed = nn.Linear(embed_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.blocks = nn.ModuleList(Block(decoder_dim, num_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(decoder_dim, eps=1e-6)
        self.pred = nn.Linear(decoder_dim, patch_dim)
        nn.init.normal_(self.mask_token, std=0.02)

    def scatter_visible(self, visible: Tensor, keep_idx: Tensor, length: int) -> Tensor:
        """Embedded visible tokens at their indices ``keep_idx`` ``(B, N_keep)`` of a stream of ``length``
        tokens, the mask token elsewhere: ``(B, N_keep, D)`` -> ``(B, length, decoder_dim)``."""
        tokens = self.embed(visible)
        # the mask token takes the embedded tokens' dtype, not the encoder output's: under autocast
        # ``embed`` returns bf16 whatever ``visible`` is, and scatter needs one dtype
        x = self.mask_token.to(tokens.dtype).expand(tokens.shape[0], length, -1).clone()
        return x.scatter(1, keep_idx.unsqueeze(-1).expand(-1, -1, self.decoder_dim), tokens)

    def query_stream(self, visible: Tensor, keep_idx: Tensor, grid: tuple[int, ...]) -> Tensor:
        """Embedded visible tokens at their positions, the mask token elsewhere, plus fixed sin-cos
        positions: ``(B, N_keep, D)`` -> ``(B, N, decoder_dim)``."""
        x = self.scatter_visible(visible, keep_idx, math.prod(grid))
        return x + sincos_pos_embed(grid, self.decoder_dim).to(x)[None]

    def mix(self, x: Tensor) -> Tensor:
        """The decoder blocks and final norm on a query stream ``(B, L, decoder_dim)``."""
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, visible: Tensor, keep_idx: Tensor, grid: tuple[int, ...]) -> Tensor:
        return self.pred(self.mix(self.query_stream(visible, keep_idx, grid)))


#: ``objective.encoder_input``: what the encoder reads of a masked image
ENCODER_INPUTS = ("visible", "mask_tokens")
#: ``objective.target``: what the decoder predicts for a masked patch
TARGETS = ("pixels", "hog")


@OBJECTIVES.register("mae")
class MAE(Objective):
    """Masked autoencoder objective.

    Args:
        encoder: any :class:`~ssl_med.encoder.Encoder` with a fixed channel count.
        mask_ratio: fraction of tokens removed (0.75).
        norm_pix_loss: per-patch normalised targets (True, as the reference recipe).
        decoder_dim, decoder_depth, decoder_heads: decoder size (reference: 512, 8, 16).
        flip_prob: probability of a random flip per spatial axis in the view transform.
        crop_scale: area (volume) fraction range of a random resized crop before the flips (the
            reference's ``(0.2, 1.0)``); ``None`` (default): flips only.
        uniformity_weight: weight of U-MAE's uniformity term on the mean visible token, the read-out
            evaluation uses (:func:`~objectives.losses.uniformity.spectral_uniformity`; U-MAE: 0.01); 0
            (default): MAE's loss alone.
        encoder_input: ``visible`` (MAE: the kept tokens only) or ``mask_tokens`` (SimMIM-style: every
            position, masked ones as the encoder's mask token; see the module docstring).
        target: ``pixels`` (MAE) or ``hog`` (MaskFeat: each masked patch's HOG descriptor, 9 bins; 2D only).
        hog_cell_size: HOG cell side in pixels (must divide the patch); ``None``: half the patch (MaskFeat's
            2 x 2 cells per patch), the whole patch when it is odd.
        in_chans: channels to reconstruct; only needed for channel-adaptive encoders (``in_chans`` None),
            whose input channel count is set by the data (the YAML passes ``${data.num_channels}``).
    """

    geometric_views = True  # flips and mask noise only
    eval_features = "mean_patch"  # no MAE loss term trains the CLS token

    def __init__(
        self,
        encoder: Encoder,
        mask_ratio: float = 0.75,
        norm_pix_loss: bool = True,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        flip_prob: float = 0.5,
        in_chans: int | None = None,
        crop_scale: tuple[float, float] | None = None,
        uniformity_weight: float = 0.0,
        encoder_input: str = "visible",
        target: str = "pixels",
        hog_cell_size: int | None = None,
    ) -> None:
        super().__init__(encoder)
        if encoder_input not in ENCODER_INPUTS:
            raise ValueError(f"objective.encoder_input={encoder_input!r}; choose from {list(ENCODER_INPUTS)}")
        if target not in TARGETS:
            raise ValueError(f"objective.target={target!r}; choose from {list(TARGETS)}")
        self.target = target
        self.encoder_input = encoder_input
        self.in_chans = reconstruction_channels(encoder, in_chans)
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        self.mask_ratio = mask_ratio
        self.norm_pix_loss = norm_pix_loss
        self.flip_prob = flip_prob
        if crop_scale is not None and not 0.0 < crop_scale[0] <= crop_scale[1] <= 1.0:
            raise ValueError(f"objective.crop_scale must be [lo, hi] with 0 < lo <= hi <= 1, got {list(crop_scale)}")
        self.crop_scale = tuple(crop_scale) if crop_scale is not None else None
        self.geometric_views = self.crop_scale is None  # a resized crop interpolates normalised crops
        if uniformity_weight < 0:
            raise ValueError(f"objective.uniformity_weight must be >= 0, got {uniformity_weight}")
        self.uniformity_weight = float(uniformity_weight)
        patch_dim = math.prod(encoder.patch_size) * self.in_chans
        if target == "hog":
            self.hog_cell_size = hog_cell_size or default_cell_size(encoder.patch_size)
            try:
                patch_dim = hog_dim(encoder.patch_size, self.hog_cell_size, self.in_chans)
            except ValueError as err:
                raise ValueError(f"objective.target=hog (objective.hog_cell_size={hog_cell_size}): {err}") from None
        self.decoder = MAEDecoder(encoder.embed_dim, decoder_dim, decoder_depth, decoder_heads, patch_dim)

    def view_transform(self) -> Callable[[Sample], Sample]:
        return MAEViews(self.encoder.spatial_dims, self.encoder.patch_size, self.flip_prob, self.crop_scale)

    def forward(self, batch: dict[str, Any], noise: Tensor | None = None) -> ObjectiveOutput:
        """One step; masking noise ``(B, N)`` from ``noise``, else ``batch["mask_noise"]`` (drawn in the
        view transform), else drawn here."""
        images = batch["image"]
        grid = self.encoder.grid_shape(images.shape[2:])
        if noise is None:
            noise = batch.get("mask_noise")
        if noise is None:
            noise = torch.rand(images.shape[0], math.prod(grid), device=images.device)
        keep_idx, mask = random_masking(noise, self.mask_ratio)
        pred, visible = self._encode_decode(images, batch, keep_idx, mask, grid)
        mae = masked_patch_loss(pred, self.targets(images), mask, self.norm_pix_loss and self.target == "pixels")
        # the loss never touches the CLS token, so the collapse monitor watches the mean visible token
        embeddings = visible.mean(dim=1)
        terms = {"mae": mae.detach()}
        loss = mae
        if self.uniformity_weight > 0:
            uniformity = spectral_uniformity(embeddings)
            terms["uniformity"] = uniformity.detach()
            loss = mae + self.uniformity_weight * uniformity
        return ObjectiveOutput(loss=loss, terms=terms, embeddings=embeddings.detach())

    def targets(self, images: Tensor) -> Tensor:
        """What the decoder predicts per patch, before ``norm_pix_loss``: ``(B, C, *S)`` -> ``(B, N, P)``, the
        patch's pixels, or its HOG descriptor with ``target="hog"``."""
        if self.target == "hog":
            return hog_targets(images, self.encoder.patch_size, self.hog_cell_size)
        return patchify(images, self.encoder.patch_size)

    @torch.no_grad()
    def no_weight_decay(self) -> set[str]:
        """The encoder's, and the decoder's mask token."""
        return super().no_weight_decay() | {"decoder.mask_token"}

    def preview(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        images = batch["image"]
        grid = self.encoder.grid_shape(images.shape[2:])
        noise = torch.rand(images.shape[0], math.prod(grid), device=images.device)
        keep_idx, mask = random_masking(noise, self.mask_ratio)
        shown = {"input": images, "masked": self._masked_input(images, mask, grid)}
        if self.target != "pixels":  # a descriptor is not an image
            return shown
        pred, _ = self._encode_decode(images, batch, keep_idx, mask, grid)
        return {**shown, "reconstruction": self._reconstruct(pred, images, grid)}

    def _encode_decode(
        self, images: Tensor, batch: dict[str, Any], keep_idx: Tensor, mask: Tensor, grid: tuple[int, ...]
    ) -> tuple[Tensor, Tensor]:
        """Predicted patches ``(B, N, prod(p) * C)`` and the encoded visible tokens ``(B, N_keep, D)``, the
        encoder reading the visible tokens only or, with ``encoder_input="mask_tokens"``, every position."""
        kwargs = encoder_channel_kwargs(self.encoder, batch)
        if self.encoder_input == "visible":
            out = self.encoder(images, keep_idx=keep_idx, **kwargs)
            return self.decoder(out.patch_tokens, keep_idx, grid), out.patch_tokens
        out = self.encoder(images, mask=mask, **kwargs)
        every = torch.arange(mask.shape[1], device=mask.device).expand(mask.shape[0], -1)
        tokens = out.patch_tokens
        visible = torch.gather(tokens, 1, keep_idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        return self.decoder(tokens, every, grid), visible

    def _masked_input(self, images: Tensor, mask: Tensor, grid: tuple[int, ...]) -> Tensor:
        """``(B, C, *S)`` with masked patches zeroed (for previews)."""
        patches = patchify(images, self.encoder.patch_size) * (~mask).unsqueeze(-1)
        return unpatchify(patches, grid, self.encoder.patch_size, images.shape[1])

    def _reconstruct(self, pred: Tensor, images: Tensor, grid: tuple[int, ...]) -> Tensor:
        """De-normalised prediction ``(B, C, *S)``: with ``norm_pix_loss`` each patch's statistics are
        taken from the input so the preview is in image units."""
        pred = pred.detach()
        if self.norm_pix_loss:
            target = patchify(images, self.encoder.patch_size)
            pred = pred * (target.var(dim=-1, keepdim=True) + 1.0e-6).sqrt() + target.mean(dim=-1, keepdim=True)
        return unpatchify(pred, grid, self.encoder.patch_size, images.shape[1])
