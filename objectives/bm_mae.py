"""BM-MAE: multimodal masked autoencoder for multi-sequence MRI with missing modalities (``objective=bm_mae``).

"Multimodal Masked Autoencoder Pre-training for 3D MRI-Based Brain Tumor Analysis with Missing
Modalities" (Robinet et al., 2025; code Lucas-rbnt/BM-MAE: ``bmmae/model.py``, ``bmmae/decoders.py``,
``bmmae/loops.py``), after MultiMAE (Bachmann et al., ECCV 2022). One encoder is pretrained on all
modalities and later used on any subset without architectural change:

* **tokens per modality**: every modality (channel) is tokenised separately and the tokens of all
  modalities form one sequence ``(B, M * N)`` (modality-major). The tokeniser is the encoder's own:
  ChAda-ViT's shared single-channel patch embedding plus the modality's channel embedding, keyed by
  the store's channel names (give the exported encoder any subset of sequences by name), or the ViT's
  per-modality patch kernels and modality embeddings (``channel_tokens=per_modality``, the
  reference's layout; sequences by input slot, an absent one marked by ``channel_padding_mask``);
* **multimodal masking** (:mod:`objectives.multimodal_masking`): the visible budget
  ``(1 - mask_ratio) * M * N`` is split across the present modalities by a Dirichlet(``alpha``) draw,
  each modality keeps that many random patches; only the visible tokens enter the shared transformer
  (``encoder(x, token_keep_idx=...)``);
* **decoding every modality**: a light transformer decoder (:class:`MultiModalDecoder`, MAE's decoder
  with a sin-cos position and a learned modality embedding per query) sees the visible tokens and a
  mask token for every other (modality, patch), so it reconstructs all modalities, including one
  that was absent (dropped by ``data.channel_dropout``, whose ground truth the data keeps for this
  objective); one linear pixel head per modality;
* **loss**: per modality the MSE over its masked patches, summed over modalities (``bmmae/loops.py``),
  leaving out sequences a case lacks in the store (``channel_available``, ``data.channels``);
  each term is logged (``recon_<name>``, the store's channel name, else ``recon_c<i>``).

Deviations from the reference, on purpose:
    * with ChAda-ViT, the modality tokeniser is its shared patch embedding + channel embedding instead
      of one convolution per modality (what makes the encoder usable on unseen subsets and orders
      without code); the ViT has the reference's one convolution per modality, plus a learned
      modality embedding. The decoder's output is one linear head per modality instead of one shared head;
    * images may lack modalities (modality dropout): the Dirichlet split runs over the present ones,
      and the visible budget is that of the image with the fewest (:func:`visible_budget`); absent
      modalities with ground truth are reconstruction targets;
    * the reference's decoder carries the CLS token through the decoder; here the decoder sees patch
      tokens only (as ssl_med's MAE), and the kept indices are sorted;
    * 2D and 3D share the code (the reference is 3D only); ``norm_pix_loss`` is off by default as the
      reference (a held-out sequence has no per-patch statistics to de-normalise with).

Backbones: encoders with one token per (channel, patch) and their selection ``token_keep_idx``
(``tokens_per_channel``): ``chada_vit``, and ``vit`` with ``channel_tokens=per_modality`` (what
``backbone=vit objective=bm_mae`` builds: ``conf/backbone/vit.yaml`` reads this objective's
``channel_tokens``), see :attr:`BMMAE.backbones`. Mamba and xLSTM fuse the channels in their patch
embedding, so a per-modality token sequence cannot reach their blocks through the encoder interface.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from objectives.mae import MAEDecoder, masked_patch_loss
from objectives.multimodal_masking import dirichlet_split, multimodal_masking, visible_budget
from objectives.views import RandFlips
from ssl_med.data.channels import (
    AVAILABLE_KEY,
    batch_channel_names,
    encoder_channel_kwargs,
    is_placeholder,
    present_channels,
)
from ssl_med.encoder import Encoder
from ssl_med.layers.patch_embed import patchify, unpatchify
from ssl_med.layers.pos_embed import sincos_pos_embed
from ssl_med.objective import Objective, ObjectiveOutput, Sample
from ssl_med.registry import OBJECTIVES


class MultiModalFlips(RandFlips):
    """MAE's random flips for all channels at once; dropped channels reach the objective un-zeroed
    (``keeps_dropped_channels``: they are reconstruction targets), with ``channel_mask``."""

    keeps_dropped_channels = True


class MultiModalDecoder(MAEDecoder):
    """MAE's decoder over all modalities: ``(B, K, D)`` visible tokens at ``keep_idx`` ``(B, K)`` of the
    modality-major ``M * N`` stream -> pixels ``(B, M, N, P)``.

    Each query carries the sin-cos position of its patch plus a learned embedding of its modality;
    one linear pixel head per modality.
    """

    def __init__(
        self, embed_dim: int, decoder_dim: int, depth: int, num_heads: int, patch_dim: int, modalities: int
    ) -> None:
        super().__init__(embed_dim, decoder_dim, depth, num_heads, patch_dim)
        self.modalities = modalities
        self.pred = nn.ModuleList(nn.Linear(decoder_dim, patch_dim) for _ in range(modalities))
        self.modality_embed = nn.Parameter(torch.zeros(modalities, decoder_dim))
        nn.init.trunc_normal_(self.modality_embed, std=0.02)

    def forward(self, visible: Tensor, keep_idx: Tensor, grid: tuple[int, ...]) -> Tensor:  # type: ignore[override]
        m, n, d = self.modalities, math.prod(grid), self.decoder_dim
        x = self.scatter_visible(visible, keep_idx, m * n)
        queries = sincos_pos_embed(grid, d).to(x)[None] + self.modality_embed.to(x)[:, None]  # (M, N, d)
        x = self.mix(x + queries.reshape(1, m * n, d)).reshape(x.shape[0], m, n, d)
        return torch.stack([head(x[:, i]) for i, head in enumerate(self.pred)], dim=1)


def modality_patches(images: Tensor, patch_size: tuple[int, ...]) -> Tensor:
    """``(B, M, *S)`` -> per-modality patch vectors ``(B, M, N, prod(p))``."""
    b, m = images.shape[:2]
    flat = patchify(images.reshape(b * m, 1, *images.shape[2:]), patch_size)
    return flat.reshape(b, m, *flat.shape[1:])


@OBJECTIVES.register("bm_mae")
class BMMAE(Objective):
    """BM-MAE objective (see the module docstring).

    Args:
        encoder: an encoder with one token per (channel, patch) and ``token_keep_idx``
            (``backbone=chada_vit``, or ``backbone=vit`` with ``channel_tokens=per_modality``).
        in_chans: modalities (channels) per image, reconstructed each (``${data.num_channels}``).
        mask_ratio: fraction of the tokens of all modalities that are masked (0.75, as the reference).
        alpha: Dirichlet concentration of the budget split (1.0, as the reference: uniform over splits).
        norm_pix_loss: per-patch normalised targets (off, as the reference).
        decoder_dim, decoder_depth, decoder_heads: decoder size (reference: 384, 3, 12).
        flip_prob: probability of a random flip per spatial axis (all modalities together).
        modality_names: names of the loss terms (``recon_<name>``); default: the batch's channel names.
        channel_tokens: the token layout this objective asks of a ViT (``per_modality``, the only
            valid value); ``conf/backbone/vit.yaml`` reads it, so ``backbone=vit objective=bm_mae``
            builds the per-modality ViT.
    """

    geometric_views = True  # flips only
    eval_features = "mean_patch"
    #: the backbones this objective pairs with (the pair matrix skips the others, with the reason below)
    backbones: ClassVar[tuple[str, ...]] = ("chada_vit", "vit")
    backbone_reason: ClassVar[str] = (
        "bm_mae needs per-(channel, patch) tokens (encoder(x, token_keep_idx=...)): backbone=chada_vit, or "
        "backbone=vit with backbone.channel_tokens=per_modality; mamba and xlstm fuse the modalities in their "
        "patch embedding"
    )

    def __init__(
        self,
        encoder: Encoder,
        in_chans: int | None = None,
        mask_ratio: float = 0.75,
        alpha: float = 1.0,
        norm_pix_loss: bool = False,
        decoder_dim: int = 128,
        decoder_depth: int = 2,
        decoder_heads: int = 4,
        flip_prob: float = 0.5,
        modality_names: list[str] | None = None,
        channel_tokens: str = "per_modality",
    ) -> None:
        super().__init__(encoder)
        if channel_tokens != "per_modality":
            raise ValueError(f"bm_mae tokenises each modality: channel_tokens must be per_modality, got {channel_tokens!r}")
        if not getattr(encoder, "tokens_per_channel", False):
            raise ValueError(f"{self.backbone_reason}; got {type(encoder).__name__}")
        if in_chans is None or in_chans < 1:
            raise ValueError("bm_mae reconstructs every modality: set in_chans (data.num_channels, e.g. 4 for BraTS)")
        if not 0.0 < mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in (0, 1), got {mask_ratio}")
        if alpha <= 0:
            raise ValueError(f"alpha (Dirichlet concentration) must be positive, got {alpha}")
        if encoder.in_chans is not None and encoder.in_chans != in_chans:
            raise ValueError(f"the encoder has {encoder.in_chans} input modalities, bm_mae was given in_chans={in_chans}")
        if modality_names is not None and len(modality_names) != in_chans:
            raise ValueError(f"modality_names {modality_names} must name the {in_chans} channels")
        self.in_chans = in_chans
        self.mask_ratio = mask_ratio
        self.alpha = alpha
        self.norm_pix_loss = norm_pix_loss
        self.flip_prob = flip_prob
        self.modality_names = list(modality_names) if modality_names else None
        patch_dim = math.prod(encoder.patch_size)
        self.decoder = MultiModalDecoder(encoder.embed_dim, decoder_dim, decoder_depth, decoder_heads, patch_dim, in_chans)

    def view_transform(self) -> Callable[[Sample], Sample]:
        return MultiModalFlips(self.encoder.spatial_dims, self.flip_prob)

    def draw_masks(self, present: Tensor, grid: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """``keep_idx`` ``(B, K)`` and ``mask`` ``(B, M, N)`` for images with modalities ``present`` ``(B, M)``."""
        b, m = present.shape
        n = math.prod(grid)
        n_visible = visible_budget(present, n, self.mask_ratio)
        props = dirichlet_split(present.cpu(), n_visible, n, self.alpha).to(present.device)
        noise = torch.rand(b, m, n, device=present.device)
        order = torch.rand(b, m * n, device=present.device)
        return multimodal_masking(props, noise, order, n_visible, present)

    def predict(self, batch: dict[str, Any], keep_idx: Tensor, grid: tuple[int, ...]) -> tuple[Tensor, Tensor]:
        """Encoder on the visible tokens ``keep_idx`` and decoder: pixels ``(B, M, N, P)`` and the
        mean visible token ``(B, D)``."""
        images = batch["image"]
        if images.shape[1] != self.in_chans:
            raise ValueError(f"bm_mae was built for {self.in_chans} modalities, the batch has {images.shape[1]}")
        out = self.encoder(images, token_keep_idx=keep_idx, **encoder_channel_kwargs(self.encoder, batch))
        return self.decoder(out.patch_tokens, keep_idx, grid), out.patch_tokens.mean(dim=1)

    def forward(self, batch: dict[str, Any]) -> ObjectiveOutput:
        """One step on ``batch["image"]`` ``(B, M, *S)`` (with ``channel_mask`` ``(B, M)`` under modality
        dropout); ``terms``: ``bm_mae`` (the loss) and ``recon_<modality>`` per modality."""
        images = batch["image"]
        grid = self.encoder.grid_shape(images.shape[2:])
        keep_idx, mask = self.draw_masks(present_channels(batch, images), grid)
        pred, embeddings = self.predict(batch, keep_idx, grid)
        target = modality_patches(images, self.encoder.patch_size)
        truth = batch.get(AVAILABLE_KEY)  # sequences a case lacks have no ground truth: not scored
        if truth is not None:
            mask = mask & truth.to(device=mask.device, dtype=torch.bool)[:, :, None]
        per_modality = [
            masked_patch_loss(pred[:, i], target[:, i], mask[:, i], self.norm_pix_loss) for i in range(self.in_chans)
        ]
        loss = torch.stack(per_modality).sum()
        terms = {"bm_mae": loss.detach()}
        for name, value in zip(self.term_names(batch), per_modality, strict=True):
            terms[f"recon_{name}"] = value.detach()
        return ObjectiveOutput(loss=loss, terms=terms, embeddings=embeddings.detach())

    def term_names(self, batch: dict[str, Any]) -> list[str]:
        """One name per modality for the loss terms: ``modality_names``, else the first image's channel
        names (lower case) when the store named them, else ``c0``, ``c1``, ..."""
        if self.modality_names:
            return [n.lower() for n in self.modality_names]
        names = batch_channel_names(batch)
        if names and len(names[0]) == self.in_chans and not is_placeholder(names[0]):
            return [n.strip().lower() for n in names[0]]
        return [f"c{i}" for i in range(self.in_chans)]

    def no_weight_decay(self) -> set[str]:
        """The encoder's, and the decoder's mask token and modality embeddings."""
        return super().no_weight_decay() | {"decoder.mask_token", "decoder.modality_embed"}

    @torch.no_grad()
    def reconstruct(self, batch: dict[str, Any], available: Tensor) -> Tensor:
        """Every modality ``(B, M, *S)`` reconstructed from all patches of the ``available`` ``(B, M)``
        modalities (each image the same number of them): the missing-sequence synthesis of BM-MAE.
        Patches of available modalities are returned as the decoder predicts them too."""
        images = batch["image"]
        b, m = available.shape
        grid = self.encoder.grid_shape(images.shape[2:])
        n = math.prod(grid)
        counts = available.sum(dim=1)
        if not bool((counts == counts[0]).all()) or int(counts[0]) == 0:
            raise ValueError("reconstruct needs the same, non-zero number of available modalities per image")
        token_present = available[:, :, None].expand(b, m, n).reshape(b, m * n)
        keep_idx = token_present.float().argsort(dim=1, descending=True, stable=True)[:, : int(counts[0]) * n]
        keep_idx = keep_idx.sort(dim=1).values
        pred, _ = self.predict({**batch, "channel_mask": available}, keep_idx, grid)  # (B, M, N, P)
        flat = pred.reshape(b * m, n, -1)
        return unpatchify(flat, grid, self.encoder.patch_size, 1).reshape(b, m, *images.shape[2:])

    @torch.no_grad()
    def preview(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """The input, the visible patches and the reconstruction of every modality ``(B, M, *S)``."""
        images = batch["image"]
        grid = self.encoder.grid_shape(images.shape[2:])
        keep_idx, mask = self.draw_masks(present_channels(batch, images), grid)
        pred, _ = self.predict(batch, keep_idx, grid)
        b, m = images.shape[:2]
        visible = modality_patches(images, self.encoder.patch_size) * (~mask).unsqueeze(-1)
        shape = (b, m, *images.shape[2:])
        p = self.encoder.patch_size
        return {
            "input": images,
            "masked": unpatchify(visible.flatten(0, 1), grid, p, 1).reshape(shape),
            "reconstruction": unpatchify(pred.detach().flatten(0, 1), grid, p, 1).reshape(shape),
        }
