"""Channel-adaptive ViT (ChAda-ViT, Bourriez et al. 2023), 2D and 3D (``backbone=chada_vit``).

Every channel of an image is a separate 1-channel image: one **shared** single-channel patch
embedding turns channel ``c`` into ``N`` tokens, to which the spatial position of the patch (shared
by all channels) and a **channel embedding** are added. Attention then runs over all
``1 + C x N`` tokens (one CLS token, then channel-major: all patches of channel 0, then channel 1, ...),
so it mixes within and across channels. An image may have any number of channels, in any order and
of any kind: the channel embedding says what a channel is.

How a batch with different channel counts arrives
-------------------------------------------------
``x`` is ``(B, C_max, *S)``: image ``b``'s channels in slots ``0 .. C_max-1``; slots it does not have
are *missing* (their content is ignored, zeros by convention). Missing slots are given by either or
both of

* ``channel_names``: one entry per image, each either ``None`` (no names: all ``C_max`` slots present,
  channel embedding by slot index) or a list of up to ``C_max`` names where ``None``/``""`` marks a
  missing slot (a shorter list means the remaining slots are missing);
* ``channel_padding_mask``: ``(B, C_max)`` bool, True where the slot is missing (the torch
  ``key_padding_mask`` convention).

:func:`collate_channels` builds all three from a list of ``(C_b, *S)`` images. A slot missing in
every image of the batch is dropped before any computation. Missing slots need not be trailing (a
BraTS case without T1ce is ``["t1", None, "t2", "flair"]``).

Channel embedding: a name found in ``channel_vocab`` (case-insensitive) selects its learned row; an
image without names uses a learned row per slot index (``max_channels`` rows). A name that is not in
the vocabulary is an error. Common spellings of the brain MRI sequences are aliases of the BraTS
names when those are in the vocabulary (:data:`CHANNEL_ALIASES`: BraTS 2023's ``t1n t1c t2w t2f``,
``t1gd``, ``t2-flair``, ...), so a later user's ``FLAIR`` or ``t2f`` selects the row pretraining
learnt for ``flair``; the vocabulary is a constructor argument, so it is saved in the exported
``config.json`` and the rows keep their meaning. Both tables sit in one lookup so that every row gets a gradient (zero
when unused), which keeps DDP happy.

Outputs (``EncoderOutput``):

* ``pooled`` ``(B, D)``: the CLS token after the final norm (as the reference's DINO embedding);
* ``patch_tokens`` ``(B, N, D)``: per spatial patch, the mean over the image's present channels of
  the final-normed (channel, patch) tokens, so dense heads see an ordinary grid;
* ``hidden_states``: the same channel mean of the raw residual stream after the chosen blocks;
* ``prefix_tokens`` ``(B, 1, D)``: the normed CLS token.

``mask`` ``(B, N)`` and ``keep_idx`` ``(B, N_keep)`` index **spatial** patches: a masked patch has the
mask token in *all* its channels (plus that channel's embedding and the position), a dropped patch is
dropped in all channels. Per-(channel, patch) selection is ``token_keep_idx`` ``(B, K)``: indices
``c * N + n`` into the channel-major (channel, patch) tokens; only those enter the blocks (BM-MAE's
multimodal masking), and ``patch_tokens`` / ``hidden_states`` are then the ``K`` kept tokens
themselves, ``(B, K, D)`` in the order of ``token_keep_idx``, not a channel mean.

The sequence of one token per (channel, patch) and the handling of missing channels are
:class:`backbones.channel_tokens.ChannelTokenEncoder`'s, shared with the ViT's per-modality tokens
(``backbone=vit backbone.channel_tokens=per_modality``); this module adds the shared single-channel
patch embedding and the channel embedding by name.

Missing channels are excluded with a key-padding mask (every attention kernel), or, when
``packing="pack"`` or ``packing="auto"`` with the xformers kernel (CUDA), the valid tokens of all
images are packed into one sequence and attention is block-diagonal (xformers ``BlockDiagonalMask``),
so missing channels cost nothing (:func:`ssl_med.layers.attention.pack_padded`). Padded or packed,
the result on the valid tokens is the same, and an image's output does not depend on the other
images of the batch.

Deviations from the reference (nicoboou/chada_vit @1aff2b5, ``src/backbones/vit/chada_vit.py``):

* ssl_med's pre-norm :class:`~ssl_med.layers.transformer.Block` (GELU MLP of ``mlp_ratio * D``,
  LayerNorm eps 1e-6, optional LayerScale) instead of torch's ``TransformerEncoderLayer`` with
  ``norm_first=False``, whose attention also sees ``norm1(x)`` (a double-norm post-LN quirk) and whose
  MLP is a fixed 2048-wide ReLU MLP;
* the stochastic-depth schedule is real DropPath (the reference reuses it as plain dropout);
* the number of heads follows ``size`` (tiny: 3) instead of a hard-coded 2;
* the channel embedding is always added (the reference silently skips it unless its method argument
  ``max_channels`` equals the literal 10), and it is per channel *name* when names are known (the
  reference only has one per index);
* missing channels come from an explicit mask, not from tokens that happen to be exactly zero
  (which also masked real all-zero patches, e.g. background) computed before the embeddings;
  missing slots may be anywhere, not only trailing, and are not patch-embedded at all;
* the output is a regular ``(B, N, D)`` grid (channel mean) instead of the ragged concatenation of
  all valid tokens; ``return_layers`` works (the reference's ``get_intermediate_layers`` is broken);
* position tables are resampled as in every ssl_med encoder (no DINO ``+0.1`` offset), and 3D
  inputs are supported (spatial position 3D, e.g. multi-sequence MRI).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from backbones.channel_tokens import ChannelTokenEncoder, missing_slots
from backbones.vit import VIT_SIZES, build_blocks, init_weights, load_pretrained_weights
from ssl_med.encoder import EncoderOutput, size_preset
from ssl_med.layers.attention import AttnImpl
from ssl_med.layers.transformer import Block
from ssl_med.registry import BACKBONES

ChannelNames = Sequence[Sequence[str | None] | None]


@BACKBONES.register("chada_vit")
class ChAdaViT(ChannelTokenEncoder):
    """Channel-adaptive ViT encoder, 2D or 3D; see the module docstring for inputs and outputs.

    Args:
        spatial_dims: 2 or 3.
        in_chans: must be ``None`` (any number of channels); present for a uniform constructor.
        img_size: input size the learned position table is made for (others are interpolated).
        patch_size: int or one per axis.
        size: ``tiny|small|base|large`` (timm's widths); ``embed_dim``/``depth``/``num_heads`` override.
        mlp_ratio: MLP hidden width / D.
        qkv_bias: bias on the qkv projection.
        drop_path_rate: stochastic depth, linearly increasing over blocks.
        init_values: LayerScale init (``None``: off).
        pos_embed: ``learned`` or ``sincos`` spatial positions.
        channel_vocab: known channel names, one learned embedding each (e.g. ``[t1, t1ce, t2, flair]``);
            ``None``: names only mark missing slots and embeddings are per slot.
        max_channels: number of per-slot channel embeddings (slots usable by images without names).
        packing: ``auto`` (pack when the attention kernel is xformers), ``pad`` or ``pack``.
        attn_impl: ``auto|sdpa|xformers|math``.
        init_from: local ViT weights file (timm, ssl_med, DINOv2 or transformers ``Dinov2Model``, see
            :func:`backbones.vit.read_state_dict`) to start from; the patch kernel is summed
            to one channel, the channel embeddings stay at their init.

    Shapes: ``x`` ``(B, C, *S)`` -> ``pooled (B, D)``, ``patch_tokens (B, N, D)``, ``N = prod(S_i/p_i)``.
    """

    block_classes = (Block,)  # FSDP's per-block unit (Encoder.block_classes)

    def __init__(
        self,
        spatial_dims: int = 2,
        in_chans: int | None = None,
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
        channel_vocab: Sequence[str] | None = None,
        max_channels: int = 10,
        packing: Literal["auto", "pad", "pack"] = "auto",
        attn_impl: AttnImpl = "auto",
        init_from: str | None = None,
    ) -> None:
        if in_chans is not None:
            raise ValueError(
                "chada_vit is channel-adaptive: leave in_chans=None and describe the channels per batch "
                "with channel_names / channel_padding_mask"
            )
        if packing not in ("auto", "pad", "pack"):
            raise ValueError(f"packing must be auto, pad or pack, got {packing!r}")
        if max_channels < 1:
            raise ValueError(f"max_channels must be positive, got {max_channels}")
        embed_dim, depth, num_heads = size_preset("ViT", VIT_SIZES, size, embed_dim, depth, num_heads)
        super().__init__(
            spatial_dims=spatial_dims,
            in_chans=1,  # the shared single-channel patch embedding
            patch_size=patch_size,
            embed_dim=embed_dim,
            depth=depth,
            img_size=img_size,
            pos_embed=pos_embed,
            class_token=True,
            pos_embed_prefix=True,
            pooling="cls",
            norm_layer=lambda dim: nn.LayerNorm(dim, eps=1e-6),
        )
        self.in_chans = None
        self.num_heads = num_heads
        self.packing = packing
        self.attn_impl = attn_impl
        vocab = [_norm_name(v) for v in (channel_vocab or [])]
        if len(set(vocab)) != len(vocab) or "" in vocab:
            raise ValueError(
                f"channel_vocab must hold distinct non-empty names, got {list(channel_vocab or [])}"
            )
        self.channel_vocab: dict[str, int] = {name: i for i, name in enumerate(vocab)}
        self.max_channels = max_channels
        self.channel_embed = nn.Parameter(torch.zeros(len(vocab), embed_dim)) if vocab else None
        self.channel_pos_embed = nn.Parameter(torch.zeros(max_channels, embed_dim))
        for p in (self.channel_embed, self.channel_pos_embed):
            if p is not None:
                nn.init.trunc_normal_(p, std=0.02)
        self.blocks = build_blocks(
            embed_dim, depth, num_heads, mlp_ratio, qkv_bias, drop_path_rate, init_values, attn_impl
        )
        self.blocks.apply(init_weights)
        if init_from:
            load_pretrained_weights(self, init_from, allowed_missing=("channel_embed", "channel_pos_embed"))

    # -- channels ------------------------------------------------------------------------------
    def channel_layout(
        self,
        batch: int,
        channels: int,
        channel_names: ChannelNames | None = None,
        channel_padding_mask: Tensor | None = None,
        device: torch.device | None = None,
    ) -> tuple[Tensor, Tensor]:
        """Which slots are missing and which channel-embedding row each slot uses.

        Returns:
            ``missing`` ``(B, C)`` bool (True = missing slot) and ``ids`` ``(B, C)`` long, rows of the
            table ``[channel_embed; channel_pos_embed]`` (vocabulary rows first).
        """
        vocab_size = len(self.channel_vocab)
        missing = torch.zeros(batch, channels, dtype=torch.bool)
        ids = torch.zeros(batch, channels, dtype=torch.long)
        if channel_names is not None and len(channel_names) != batch:
            raise ValueError(f"channel_names has {len(channel_names)} entries for a batch of {batch}")
        for b in range(batch):
            names = None if channel_names is None else channel_names[b]
            if names is None:
                if channels > self.max_channels:
                    raise ValueError(
                        f"{channels} unnamed channels but max_channels={self.max_channels}; "
                        "pass channel_names or raise max_channels"
                    )
                ids[b] = vocab_size + torch.arange(channels)
                continue
            if isinstance(names, str) or len(names) > channels:
                raise ValueError(
                    f"image {b}: channel_names {names!r} must be a list of at most {channels} names"
                )
            for c in range(channels):
                name = _norm_name(names[c]) if c < len(names) else ""
                row = self.channel_row(name) if name else None
                if not name:
                    missing[b, c] = True
                elif row is not None:
                    ids[b, c] = row
                else:
                    raise ValueError(
                        f"unknown channel name {names[c]!r}; channel_vocab is {sorted(self.channel_vocab) or 'empty'}"
                    )
        return missing_slots(missing, channel_padding_mask).to(device), ids.to(device)

    def channel_row(self, name: str | None) -> int | None:
        """The vocabulary row of channel ``name`` (case-insensitive, aliases resolved), ``None`` if unknown."""
        key = _norm_name(name)
        if key in self.channel_vocab:
            return self.channel_vocab[key]
        alias = CHANNEL_ALIASES.get(key)
        return self.channel_vocab.get(alias) if alias is not None else None

    def knows_channel(self, name: str | None) -> bool:
        """Whether ``name`` has its own channel embedding (see :meth:`channel_row`)."""
        return self.channel_row(name) is not None

    def channel_table(self) -> Tensor:
        """``(V + max_channels, D)``: vocabulary embeddings, then per-slot embeddings."""
        if self.channel_embed is None:
            return self.channel_pos_embed
        return torch.cat([self.channel_embed, self.channel_pos_embed], dim=0)

    # -- forward -------------------------------------------------------------------------------
    def forward(
        self,
        x: Tensor,
        *,
        mask: Tensor | None = None,
        keep_idx: Tensor | None = None,
        return_layers: Sequence[int] = (),
        channel_names: ChannelNames | None = None,
        channel_padding_mask: Tensor | None = None,
        token_keep_idx: Tensor | None = None,
    ) -> EncoderOutput:
        """Encode ``x`` ``(B, C, *S)``; see the module docstring for the channel arguments and
        ``token_keep_idx`` ``(B, K)`` (per-(channel, patch) token selection). The names and the mask
        give each slot its channel-embedding row and its presence (:meth:`channel_layout`); the
        sequence of one token per (channel, patch) is built and encoded by
        :meth:`~backbones.channel_tokens.ChannelTokenEncoder.encode_channels`."""
        if x.ndim != self.spatial_dims + 2:
            raise ValueError(
                f"expected a (B, C, {'D, ' if self.spatial_dims == 3 else ''}H, W) tensor for "
                f"spatial_dims={self.spatial_dims}, got shape {tuple(x.shape)}"
            )
        missing, ids = self.channel_layout(x.shape[0], x.shape[1], channel_names, channel_padding_mask, x.device)
        return self.encode_channels(
            x, missing, ids, mask=mask, keep_idx=keep_idx, return_layers=return_layers, token_keep_idx=token_keep_idx
        )

    def embed_channels(self, x: Tensor, present: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        """Each present channel (``present`` ``(B, C)``) of ``x`` ``(B, C, *S)`` through the shared
        single-channel patch embedding: ``(B, C, N, D)``, zeros for missing channels (never embedded)."""
        b, c = present.shape
        emb, grid = self.patch_embed(x[present].unsqueeze(1))  # (sum_b C_b, N, D)
        n, d = emb.shape[1], emb.shape[2]
        if bool(present.all()):
            return emb.reshape(b, c, n, d), grid
        return emb.new_zeros(b, c, n, d).index_put((present,), emb), grid

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"channel_embed", "channel_pos_embed"}


def _norm_name(name: str | None) -> str:
    return "" if name is None else str(name).strip().lower()


#: other spellings of the BraTS sequence names (lower case), used when the spelling itself is not in
#: ``channel_vocab`` and its BraTS name is: BraTS 2023 (``t1n t1c t2w t2f``), ``t1gd``/``t1c+``,
#: ``t2-flair``, ``t1w``/``t2w``
CHANNEL_ALIASES: dict[str, str] = {
    "t1n": "t1", "t1w": "t1", "t1-native": "t1",
    "t1c": "t1ce", "t1gd": "t1ce", "t1-gd": "t1ce", "t1c+": "t1ce", "t1-ce": "t1ce", "t1_ce": "t1ce", "t1post": "t1ce",
    "t2w": "t2",
    "t2f": "flair", "t2-flair": "flair", "t2_flair": "flair", "t2flair": "flair",
}  # fmt: skip


def collate_channels(
    images: Sequence[Tensor], names: Sequence[Sequence[str] | None] | None = None
) -> tuple[Tensor, list[list[str | None]] | None, Tensor]:
    """Batch images with different channel counts for :class:`ChAdaViT`.

    Args:
        images: ``B`` tensors ``(C_b, *S)`` with the same spatial shape.
        names: optional channel names per image (``len(names[b]) == C_b``; ``None`` for an image
            without names is only allowed when no image has names).

    Returns:
        ``x`` ``(B, C_max, *S)`` zero-padded, ``channel_names`` (each list padded with ``None`` to
        ``C_max``, or ``None``) and ``channel_padding_mask`` ``(B, C_max)`` bool (True = missing).
    """
    if not images:
        raise ValueError("no images to collate")
    spatial = images[0].shape[1:]
    if any(im.shape[1:] != spatial for im in images):
        raise ValueError(f"all images need the same spatial shape, got {[tuple(im.shape) for im in images]}")
    c_max = max(im.shape[0] for im in images)
    x = images[0].new_zeros(len(images), c_max, *spatial)
    padding = torch.ones(len(images), c_max, dtype=torch.bool)
    for b, im in enumerate(images):
        x[b, : im.shape[0]] = im
        padding[b, : im.shape[0]] = False
    if names is None:
        return x, None, padding
    out_names: list[list[str | None]] = []
    for b, (im, nm) in enumerate(zip(images, names, strict=True)):
        if nm is None or len(nm) != im.shape[0]:
            raise ValueError(f"image {b}: expected {im.shape[0]} channel names, got {nm!r}")
        out_names.append(list(nm) + [None] * (c_max - len(nm)))
    return x, out_names, padding
