"""Evaluation on a subset of an image's channels (MRI sequences): ``eval.channels=[flair, t1ce]``.

A labelled set that knows its channel names (``SegmentationData.channel_names``: BraTS's
``eval_data.modalities``) is reduced to the requested sequences before the evaluator sees it:

* **channel-adaptive encoders** (ChAda-ViT, ``in_chans`` None): the absent sequences are *omitted*;
  the encoder is bound to the names of the ones left (:class:`ChannelBoundEncoder`), so it is handed
  ``channel_names`` on every call and looks each sequence up in its channel vocabulary. The data is
  re-read with every sequence kept (the default load averages to one channel for encoders without a
  channel count);
* **fixed-channel encoders** (ViT, Mamba, xLSTM): the absent sequences are *zero-filled*, the input
  keeps its channel count and order (as modality dropout trains them, ``data.channel_dropout``);
* **fixed-channel encoders with one token per (channel, patch)** (``encoder.tokens_per_channel``: the
  ViT with ``backbone.channel_tokens=per_modality``, what BM-MAE pretrains): the absent sequences are
  zero-filled too (the UNETR decoder's convolutional stem reads the image) and *left out* of the
  encoder's sequence: it is wrapped in :class:`ChannelMaskedEncoder`, which hands it the
  ``channel_padding_mask`` of :func:`~ssl_med.data.channels.encoder_channel_kwargs` on every call, so
  no token of an absent sequence reaches the blocks.

``eval.channel_subsets=[[flair], [t1ce, flair], ...]`` repeats the evaluation for each subset; the
segmentation evaluator reports one row per subset (:func:`subset_label` names them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ssl_med.data.channels import MASK_KEY, encoder_channel_kwargs
from ssl_med.encoder import Encoder, EncoderOutput
from ssl_med.evaluators.datasets import SegmentationData, load_eval_data


class _EncoderWrapper(Encoder):
    """An encoder that calls ``self.encoder`` with extra keywords; its parameter names and metadata are
    the wrapped encoder's under ``encoder.`` (layer-wise decay and weight decay read through)."""

    def __init__(self, encoder: Encoder, in_chans: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.in_chans = in_chans
        self.spatial_dims, self.patch_size = encoder.spatial_dims, encoder.patch_size
        self.embed_dim, self.depth = encoder.embed_dim, encoder.depth

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{n}" for n in self.encoder.no_weight_decay()}

    def layer_id(self, name: str) -> int:
        return self.encoder.layer_id(name.removeprefix("encoder."))

    def patch_embed_names(self) -> set[str]:
        return {f"encoder.{n}" for n in self.encoder.patch_embed_names()}


class ChannelBoundEncoder(_EncoderWrapper):
    """A channel-adaptive encoder with its channels fixed by name: a fixed-channel encoder to the
    evaluators' heads (UNETR's stem needs ``in_chans``). ``x`` ``(B, len(names), *S)``.

    Parameter names and metadata are the wrapped encoder's under ``encoder.`` (layer-wise decay and
    weight decay read through).
    """

    def __init__(self, encoder: Encoder, names: Sequence[str]) -> None:
        if encoder.in_chans is not None:
            raise ValueError("ChannelBoundEncoder wraps channel-adaptive encoders (in_chans None)")
        super().__init__(encoder, len(names))
        self.names = [str(n) for n in names]

    def forward(self, x: Tensor, **kwargs: Any) -> EncoderOutput:  # type: ignore[override]
        if x.shape[1] != self.in_chans:
            raise ValueError(f"expected {self.in_chans} channels {self.names}, got {x.shape[1]}")
        return self.encoder(x, channel_names=[self.names] * x.shape[0], **kwargs)


class ChannelMaskedEncoder(_EncoderWrapper):
    """A fixed-channel encoder with one token per (channel, patch) that always leaves the same input
    slots out: ``x`` ``(B, C, *S)`` is encoded with the ``channel_padding_mask`` ``(B, C)`` (True =
    absent) that :func:`~ssl_med.data.channels.encoder_channel_kwargs` builds from ``present`` ``(C,)``
    (the sequences of ``eval.channels``), so the absent slots' content is never read.

    ``present`` is a non-persistent buffer: the state dict is the wrapped encoder's under ``encoder.``.
    """

    present: Tensor

    def __init__(self, encoder: Encoder, present: Sequence[bool]) -> None:
        if encoder.in_chans is None or encoder.in_chans != len(present):
            raise ValueError(
                f"ChannelMaskedEncoder needs a {len(present)}-channel encoder, got in_chans={encoder.in_chans}"
            )
        if not any(present):
            raise ValueError("ChannelMaskedEncoder needs at least one present channel")
        super().__init__(encoder, encoder.in_chans)
        self.register_buffer("present", torch.tensor([bool(p) for p in present]), persistent=False)

    def forward(self, x: Tensor, **kwargs: Any) -> EncoderOutput:  # type: ignore[override]
        if x.shape[1] != self.in_chans:
            raise ValueError(f"expected {self.in_chans} channels, got {x.shape[1]}")
        batch = {MASK_KEY: self.present.to(x.device).expand(x.shape[0], -1)}
        channels = encoder_channel_kwargs(self.encoder, batch)
        given = kwargs.pop("channel_padding_mask", None)
        if given is not None:  # a caller's own absent slots are left out as well
            channels["channel_padding_mask"] = channels["channel_padding_mask"] | given.to(x.device)
        return self.encoder(x, **channels, **kwargs)


def subset_label(names: Sequence[str]) -> str:
    """``[t1ce, flair]`` -> ``"t1ce+flair"``."""
    return "+".join(str(n) for n in names)


def select_channels(
    data: SegmentationData, encoder: Encoder, channels: Sequence[str] | None
) -> tuple[SegmentationData, Encoder]:
    """``data`` with only ``channels`` (by name) and the encoder that reads them (see the module
    docstring); ``channels=None`` keeps every channel. A channel-adaptive encoder is always bound to
    the data's channel names (it needs names or a channel count to segment); a fixed-channel one that
    takes a ``channel_padding_mask`` (:func:`~ssl_med.data.channels.encoder_channel_kwargs`) is wrapped
    in :class:`ChannelMaskedEncoder` when channels are left out."""
    if encoder.in_chans is None:
        if data.channel_names is None and data.source is not None:
            data = load_eval_data(data.source, None)  # type: ignore[assignment]
        names = data.channel_names
        if names is None:
            if channels is not None:
                raise ValueError(f"{data.name} does not name its channels: eval.channels needs names")
            return data, _SlotBound(encoder, data.items[next(iter(data.items))][0][0].shape[0])
        wanted = _check(channels or names, names, data.name)
        index = [names.index(w) for w in wanted]
        items = {s: [(img[index], lab) for img, lab in split] for s, split in data.items.items()}
        return replace(data, items=items, channel_names=list(wanted)), ChannelBoundEncoder(encoder, wanted)
    if channels is None:
        return data, encoder
    names = data.channel_names
    if names is None:
        raise ValueError(
            f"{data.name} has no per-channel names for this {encoder.in_chans}-channel encoder (averaged or "
            "unnamed channels): eval.channels needs an encoder with one input per sequence (eval_data.modalities)"
        )
    wanted = _check(channels, names, data.name)
    absent = [i for i, n in enumerate(names) if n not in wanted]
    items = {s: [(_zero(img, absent), lab) for img, lab in split] for s, split in data.items.items()}
    present = [i not in absent for i in range(len(names))]
    if encoder_channel_kwargs(encoder, {MASK_KEY: torch.tensor([present])}):  # tokens per channel
        return replace(data, items=items), ChannelMaskedEncoder(encoder, present)
    return replace(data, items=items), encoder


class _SlotBound(ChannelBoundEncoder):
    """Bound to ``channels`` unnamed slots (per-slot channel embeddings)."""

    def __init__(self, encoder: Encoder, channels: int) -> None:
        super().__init__(encoder, [f"slot{i}" for i in range(channels)])

    def forward(self, x: Tensor, **kwargs: Any) -> EncoderOutput:  # type: ignore[override]
        return self.encoder(x, **kwargs)


def _check(wanted: Sequence[str], names: Sequence[str], dataset: str) -> list[str]:
    lower = [n.lower() for n in names]
    out = []
    for w in wanted:
        if str(w).lower() not in lower:
            raise ValueError(f"eval.channels: {w!r} is not a channel of {dataset} ({list(names)}); see eval_data.modalities")
        out.append(names[lower.index(str(w).lower())])
    if not out:
        raise ValueError("eval.channels must name at least one channel")
    return out


def _zero(image: np.ndarray, absent: Sequence[int]) -> np.ndarray:
    out = image.copy()
    out[list(absent)] = 0
    return out
