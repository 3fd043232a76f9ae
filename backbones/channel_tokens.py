"""One token per (channel, patch): the sequence model shared by ChAda-ViT and the per-modality ViT.

Multi-channel images whose channels are different things (MRI sequences, stains) can be tokenised
channel by channel instead of fusing all channels in one patch embedding: channel ``c`` of patch
``n`` becomes its own token, carrying the patch's spatial position and an embedding of its channel,
and attention runs over all ``P + C x N`` tokens (``P`` prefix tokens, then channel-major: every patch
of channel 0, then channel 1, ...). Two backbones build such sequences and differ only in how a
channel becomes tokens and which channel-embedding row it gets:

* ChAda-ViT (Bourriez et al. 2023, :mod:`backbones.chada_vit`): one shared single-channel patch
  embedding, channel embedding by name (any channels, any order);
* the ViT with ``channel_tokens="per_modality"`` (:mod:`backbones.vit`): one patch embedding per input
  slot (:class:`ModalityPatchEmbed`) and a learned embedding per slot, BM-MAE's per-modality
  tokenisers (Robinet et al. 2025, Lucas-rbnt/BM-MAE ``bmmae/tokenizers.py``: one ``PatchEmbeddingBlock``
  per modality, the tokens of all modalities concatenated for one transformer).

:class:`ChannelTokenEncoder` holds what they share: the sequence, missing channels (a key-padding mask,
or packed sequences with xformers), spatial ``mask``/``keep_idx`` applied to every channel, the
per-(channel, patch) selection ``token_keep_idx`` (BM-MAE's multimodal masking), and outputs averaged
over the present channels so that dense heads see an ordinary ``(B, N, D)`` grid.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ssl_med.encoder import EncoderOutput, TokenEncoder
from ssl_med.layers.attention import pack_padded, resolve_attn_impl, unpack_padded
from ssl_med.layers.patch_embed import PatchEmbed, grid_shape


class ModalityPatchEmbed(PatchEmbed):
    """One patch embedding per input channel (modality): a grouped strided convolution.

    Channel ``c`` has its own kernel ``(D, 1, *p)`` and bias, the rows ``c * D .. (c + 1) * D - 1`` of
    ``proj`` (``groups=C``), so this is ``C`` independent single-channel patch embeddings run as one
    convolution, not a fusion of the channels.

    Shapes: ``(B, C, *S)`` -> tokens ``(B, C, N, D)`` (raster order within each channel) and the grid.
    """

    def __init__(self, spatial_dims: int, patch_size: int | Sequence[int], in_chans: int, embed_dim: int) -> None:
        super().__init__(spatial_dims, patch_size, in_chans, embed_dim, groups=in_chans)
        self.in_chans, self.embed_dim = in_chans, embed_dim

    def forward(self, x: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        if x.shape[1] != self.in_chans:
            raise ValueError(f"expected {self.in_chans} input channels, got {x.shape[1]}")
        grid = grid_shape(x.shape[2:], self.patch_size)
        b, c = x.shape[:2]
        tokens = self.proj(x).reshape(b, c, self.embed_dim, -1).transpose(2, 3)  # (B, C, N, D)
        return tokens, grid


def missing_slots(missing: Tensor, channel_padding_mask: Tensor | None) -> Tensor:
    """``missing`` ``(B, C)`` bool or-ed with a ``channel_padding_mask`` (True = missing), checked; an
    image left without any channel is an error."""
    b, c = missing.shape
    if channel_padding_mask is not None:
        if channel_padding_mask.shape != (b, c) or channel_padding_mask.dtype != torch.bool:
            raise ValueError(
                f"channel_padding_mask must be a (B, C) = {(b, c)} bool tensor, "
                f"got {tuple(channel_padding_mask.shape)} {channel_padding_mask.dtype}"
            )
        missing = missing | channel_padding_mask.to(missing.device)
    empty = missing.all(dim=1)
    if empty.any():
        raise ValueError(f"images {empty.nonzero().flatten().tolist()} have no channel left")
    return missing


class ChannelTokenEncoder(TokenEncoder):
    """A :class:`~ssl_med.encoder.TokenEncoder` whose sequence has one token per (channel, patch).

    Subclasses provide :meth:`embed_channels` (channel tokens without positions) and
    :meth:`channel_table` (the channel-embedding rows), work out which slots are missing and which row
    each uses, and call :meth:`encode_channels`. Prefix tokens (CLS, registers) are the skeleton's and
    come first; pooling is the CLS token or the mean of the (channel-averaged) patch tokens.

    Attributes:
        tokens_per_channel: the encoder takes ``token_keep_idx`` (what ``objective=bm_mae`` needs).
        packing: ``auto`` (pack missing channels away when the attention kernel is xformers), ``pad``
            or ``pack``.
    """

    tokens_per_channel: bool = True
    packing: str = "pad"
    attn_impl: str = "auto"

    def embed_channels(self, x: Tensor, present: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        """Tokens ``(B, C, N, D)`` of ``x`` ``(B, C, *S)`` without positions (zeros where ``present``
        ``(B, C)`` is False), and the grid."""
        raise NotImplementedError

    def channel_table(self) -> Tensor:
        """``(R, D)`` channel-embedding rows, indexed by the ``ids`` given to :meth:`encode_channels`."""
        raise NotImplementedError

    def use_packing(self, device: torch.device) -> bool:
        if self.packing == "auto":
            return resolve_attn_impl(self.attn_impl, device) == "xformers"
        return self.packing == "pack"

    def encode_channels(
        self,
        x: Tensor,
        missing: Tensor,
        ids: Tensor,
        *,
        mask: Tensor | None = None,
        keep_idx: Tensor | None = None,
        return_layers: Sequence[int] = (),
        token_keep_idx: Tensor | None = None,
    ) -> EncoderOutput:
        """Encode ``x`` ``(B, C, *S)`` with slots ``missing`` ``(B, C)`` and channel-embedding rows ``ids``
        ``(B, C)``; ``mask`` ``(B, N)`` / ``keep_idx`` ``(B, K)`` select spatial patches in every channel,
        ``token_keep_idx`` ``(B, K)`` single (channel, patch) tokens (:meth:`forward_tokens`).

        The sequence is ``(B, P + C*K, D)`` with a key-padding mask (or packed sequences) for missing
        channels that every block receives, and patch outputs averaged over the present channels (the
        skeleton's hooks assume one token per patch and blocks called as ``block(x)``). A slot missing
        in every image is dropped before the blocks.
        """
        if token_keep_idx is not None:
            if mask is not None or keep_idx is not None:
                raise ValueError("token_keep_idx replaces mask and keep_idx; pass only one of them")
            return self.forward_tokens(x, ~missing, ids, token_keep_idx, return_layers)
        b = x.shape[0]
        tokens, grid = self._positioned_tokens(x, ~missing, ids, mask)  # (B, C, N, D)
        used = ~missing.all(dim=0)
        if not bool(used.all()):  # slots missing in every image
            tokens, missing = tokens[:, used], missing[:, used]
        c = tokens.shape[1]
        present = ~missing
        seq = self._channel_sequence(tokens, keep_idx)  # (B, P + C*K, D)
        length, p = seq.shape[1], self.num_prefix_tokens
        k = (length - p) // c

        key_padding = None
        if not bool(present.all()):
            key_padding = torch.cat(
                [missing.new_zeros(b, p), missing[:, :, None].expand(-1, -1, k).reshape(b, c * k)], dim=1
            )
        packed = key_padding is not None and self.use_packing(x.device)
        seqlens: list[int] | None = None
        if packed:
            seq, seqlens, pack_index = pack_padded(seq, key_padding)

        def unpack(t: Tensor) -> Tensor:
            return unpack_padded(t, pack_index, b, length) if packed else t

        wanted = self._normalise_layers(return_layers)
        hidden: dict[int, Tensor] = {}
        for i in range(self.depth):
            if packed:
                seq = self.call_block(self.blocks[i], seq, seqlens=seqlens)
            else:
                seq = self.call_block(self.blocks[i], seq, key_padding_mask=key_padding)
            if i in wanted:
                hidden[i] = self._channel_mean(unpack(seq)[:, p:], present, k)
        seq = unpack(self.norm(seq))
        return self._output(seq, self._channel_mean(seq[:, p:], present, k), grid, [hidden[i] for i in wanted])

    def forward_tokens(
        self, x: Tensor, present: Tensor, ids: Tensor, token_keep_idx: Tensor, return_layers: Sequence[int] = ()
    ) -> EncoderOutput:
        """Encode only the (channel, patch) tokens ``token_keep_idx`` ``(B, K)`` (``c * N + n``) of ``x``.

        Every kept token must belong to a present channel (``present`` ``(B, C)``), so no key padding is
        needed: the sequence is ``(B, P + K, D)``. Returns ``patch_tokens`` ``(B, K, D)`` (final-normed)
        and ``hidden_states`` ``(B, K, D)`` per requested block, in the order of ``token_keep_idx``.
        """
        b, c = present.shape
        if token_keep_idx.ndim != 2 or token_keep_idx.shape[0] != b:
            raise ValueError(f"token_keep_idx must be (B, K) with B={b}, got {tuple(token_keep_idx.shape)}")
        tokens, grid = self._positioned_tokens(x, present, ids, None)  # (B, C, N, D)
        n, d = tokens.shape[2], tokens.shape[3]
        idx = token_keep_idx.to(device=tokens.device, dtype=torch.long)
        if bool(((idx < 0) | (idx >= c * n)).any()):
            raise ValueError(f"token_keep_idx must lie in [0, C*N) = [0, {c * n})")
        if not bool(torch.gather(present, 1, torch.div(idx, n, rounding_mode="floor")).all()):
            raise ValueError("token_keep_idx selects tokens of a missing channel")
        kept = torch.gather(tokens.reshape(b, c * n, d), 1, idx[..., None].expand(-1, -1, d))
        seq = self._with_prefix(kept)
        p = self.num_prefix_tokens
        wanted = self._normalise_layers(return_layers)
        hidden: dict[int, Tensor] = {}
        for i in range(self.depth):
            seq = self.call_block(self.blocks[i], seq, key_padding_mask=None)
            if i in wanted:
                hidden[i] = seq[:, p:]
        seq = self.norm(seq)
        return self._output(seq, seq[:, p:], grid, [hidden[i] for i in wanted])

    # -- helpers ------------------------------------------------------------------------------
    def _positioned_tokens(
        self, x: Tensor, present: Tensor, ids: Tensor, mask: Tensor | None
    ) -> tuple[Tensor, tuple[int, ...]]:
        """``(B, C, N, D)``: channel tokens, ``mask`` ``(B, N)`` patches replaced by the mask token in
        every channel, plus the patch position and the channel's embedding (``ids`` ``(B, C)``)."""
        tokens, grid = self.embed_channels(x, present)
        b, n = tokens.shape[0], tokens.shape[2]
        if mask is not None:
            if mask.shape != (b, n):
                raise ValueError(f"mask must be (B, N) = {(b, n)}, got {tuple(mask.shape)}")
            tokens = torch.where(mask[:, None, :, None], self.mask_token.to(tokens.dtype), tokens)
        chan = self.channel_table()[ids].to(tokens.dtype)  # (B, C, D)
        return tokens + self.patch_position_embedding(grid)[:, None] + chan[:, :, None], grid

    def _channel_sequence(self, tokens: Tensor, keep_idx: Tensor | None) -> Tensor:
        """Tokens ``(B, C, N, D)`` -> the sequence ``(B, P + C*K, D)``: prefix tokens, then the ``K``
        kept patches (``keep_idx`` ``(B, K)``, all ``N`` without it) of each channel in turn."""
        b, c, _, d = tokens.shape
        if keep_idx is not None:
            if keep_idx.ndim != 2 or keep_idx.shape[0] != b:
                raise ValueError(f"keep_idx must be (B, N_keep) with B={b}, got {tuple(keep_idx.shape)}")
            tokens = torch.gather(tokens, 2, keep_idx[:, None, :, None].expand(-1, c, -1, d))
        return self._with_prefix(tokens.reshape(b, -1, d))

    def _with_prefix(self, tokens: Tensor) -> Tensor:
        """``(B, L, D)`` -> ``(B, P + L, D)`` with the skeleton's prefix tokens (CLS + its position, registers)."""
        prefix = self.prefix_tokens(tokens.shape[0])
        return tokens if prefix is None else torch.cat([prefix.to(tokens.dtype), tokens], dim=1)

    def _output(self, seq: Tensor, patches: Tensor, grid: tuple[int, ...], hidden: list[Tensor]) -> EncoderOutput:
        """The encoder output of the final-normed ``seq`` ``(B, P + L, D)`` and its ``patches``."""
        prefix = seq[:, : self.num_prefix_tokens] if self.num_prefix_tokens else None
        if self.pooling == "cls" and prefix is not None:
            pooled = prefix[:, 0]
        elif self.pooling == "mean":
            pooled = patches.mean(dim=1)
        else:
            raise ValueError(f"pooling {self.pooling!r} is not supported with one token per (channel, patch)")
        return EncoderOutput(pooled=pooled, patch_tokens=patches, grid=grid, hidden_states=hidden, prefix_tokens=prefix)

    @staticmethod
    def _channel_mean(tokens: Tensor, present: Tensor, k: int) -> Tensor:
        """``(B, C*K, D)`` channel-major tokens -> ``(B, K, D)`` mean over the present channels."""
        b, c = present.shape
        tokens = tokens.reshape(b, c, k, -1)
        if bool(present.all()):
            return tokens.mean(dim=1)
        weight = present.to(tokens.dtype)[:, :, None, None]
        # where(), not a product: padded tokens are excluded even if they were not finite
        summed = torch.where(weight > 0, tokens, tokens.new_zeros(())).sum(dim=1)
        return summed / weight.sum(dim=1)
