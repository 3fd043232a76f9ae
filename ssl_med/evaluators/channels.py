"""Evaluation on a subset of an image's channels (MRI sequences): ``eval.channels=[flair, t1ce]``.

A labelled set that knows its channel names (``SegmentationData.channel_names``: BraTS's
``eval_data.modalities``; ``ClassificationData.channel_names``: a MedMNIST-style file's
``eval_data.channel_names``) is reduced to the requested sequences before the evaluator sees it:

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

``eval.channel_subsets=[[flair], [t1ce, flair], ...]`` repeats the evaluation for each subset
(:func:`evaluate_channels`, used by every evaluator): one row per subset (:func:`subset_label` names
them) in ``details["subsets"]``, metrics ``<subset>/<metric>``. :func:`check_channel_request` checks the
requested names against the ``eval_data`` config before any model or data is loaded.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any, TypeVar

import torch
from torch import Tensor

from ssl_med.data.channels import MASK_KEY, encoder_channel_kwargs
from ssl_med.encoder import Encoder, EncoderOutput
from ssl_med.evaluators.base import EvalContext, EvalResult
from ssl_med.evaluators.datasets import (
    ClassificationData,
    SegmentationData,
    configured_channel_names,
    load_eval_data,
)

EvalData = ClassificationData | SegmentationData
D = TypeVar("D", ClassificationData, SegmentationData)


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


def requested_subsets(cfg: dict[str, Any]) -> list[tuple[str, list[str] | None]]:
    """The evaluations ``eval`` asks for: ``(option, channels)`` pairs, one per ``eval.channel_subsets``
    entry, else ``("eval.channels", channels or None)``; both options set is an error."""
    subsets, channels = cfg.get("channel_subsets"), cfg.get("channels")
    if subsets and channels:
        raise ValueError("set eval.channels or eval.channel_subsets, not both")
    if subsets:
        return [("eval.channel_subsets", [str(n) for n in subset]) for subset in subsets]
    return [("eval.channels", [str(n) for n in channels] if channels else None)]


def check_channel_request(eval_cfg: dict[str, Any], data_cfg: dict[str, Any]) -> None:
    """Fail before any work when ``eval.channels`` / ``eval.channel_subsets`` name a channel that the
    ``eval_data`` config does not (its :func:`~ssl_med.evaluators.datasets.configured_channel_names`),
    or when the config names no channels at all."""
    names = configured_channel_names(data_cfg)
    for option, channels in requested_subsets(eval_cfg):
        if channels is not None:
            _check(channels, names, str(data_cfg.get("name")), option, _names_option(data_cfg))


def evaluate_channels(
    run: Callable[[Encoder, dict[str, Any], EvalData, EvalContext], EvalResult],
    encoder: Encoder,
    cfg: dict[str, Any],
    data: EvalData,
    ctx: EvalContext,
    *,
    subset_cfg: dict[str, Any] | None = None,
    row_details: Sequence[str] = (),
) -> EvalResult:
    """``run(encoder, cfg, data, ctx)`` on the channels ``cfg`` asks for (:func:`select_channels`).

    With ``eval.channel_subsets`` it runs once per subset (``cfg`` updated by ``subset_cfg``; every
    subset is checked first): the metrics of subset ``s`` are ``<s>/<metric>``, the headline metrics
    and details are the first subset's, and ``details["subsets"]`` is the table, one row
    ``{"subset", "channels", "metrics", <row_details of its details>}`` per subset. The feature-cache
    key (``ctx.dataset_key``) gets the subset's label, as the images differ.
    """
    requests = requested_subsets(cfg)
    if any(c is not None for _, c in requests):
        names = data.channel_names or (configured_channel_names(data.source) if data.source else None)
        for option, channels in requests:
            _check(channels or [], names, data.name, option, _names_option(data.source or {}))
    if requests[0][0] == "eval.channels":
        sub_data, sub_encoder = select_channels(data, encoder, requests[0][1])
        return run(sub_encoder, cfg, sub_data, _keyed(ctx, requests[0][1]))
    if encoder.in_chans is None:
        data = _every_channel(data)  # read once for all subsets
    first: EvalResult | None = None
    metrics: dict[str, float] = {}
    table: list[dict[str, Any]] = []
    for _, channels in requests:
        sub_data, sub_encoder = select_channels(data, encoder, channels)
        result = run(sub_encoder, {**cfg, **(subset_cfg or {})}, sub_data, _keyed(ctx, channels))
        label = subset_label(channels or [])
        details = {k: result.details[k] for k in row_details if k in result.details}
        table.append({"subset": label, "channels": list(channels or []), "metrics": result.metrics, **details})
        metrics.update({f"{label}/{k}": v for k, v in result.metrics.items()})
        first = first or result
    assert first is not None
    return EvalResult(metrics={**first.metrics, **metrics}, details={**first.details, "subsets": table})


def select_channels(data: D, encoder: Encoder, channels: Sequence[str] | None) -> tuple[D, Encoder]:
    """``data`` with only ``channels`` (by name) and the encoder that reads them (see the module
    docstring); ``channels=None`` keeps every channel. A channel-adaptive encoder is bound to the data's
    channel names whenever the data has them (and, for segmentation, which needs a channel count for
    UNETR's stem, to unnamed slots otherwise); a fixed-channel one that takes a
    ``channel_padding_mask`` (:func:`~ssl_med.data.channels.encoder_channel_kwargs`) is wrapped in
    :class:`ChannelMaskedEncoder` when channels are left out."""
    option = _names_option(data.source or {})
    if channels is None and isinstance(data, ClassificationData) and not _named(data):
        return data, encoder  # nothing to select or bind by name (a classification head needs no channel count)
    if encoder.in_chans is None:
        data = _every_channel(data)
        names = data.channel_names
        if names is None:
            if channels is not None:
                _check(channels, None, data.name, "eval.channels", option)
            return data, _SlotBound(encoder, data.items[next(iter(data.items))][0][0].shape[0])
        wanted = _check(channels or names, names, data.name, "eval.channels", option)
        return _map_images(data, lambda x: x[[names.index(w) for w in wanted]], wanted), ChannelBoundEncoder(
            encoder, wanted
        )
    if channels is None:
        return data, encoder
    names = data.channel_names
    if names is None:
        raise ValueError(
            f"{data.name} has no per-channel names for this {encoder.in_chans}-channel encoder (averaged or "
            f"unnamed channels): eval.channels needs an encoder with one input per sequence ({option})"
        )
    wanted = _check(channels, names, data.name, "eval.channels", option)
    absent = [i for i, n in enumerate(names) if n not in wanted]
    present = [i not in absent for i in range(len(names))]
    zeroed = _map_images(data, lambda x: _zero(x, absent), names)
    if encoder_channel_kwargs(encoder, {MASK_KEY: torch.tensor([present])}):  # tokens per channel
        return zeroed, ChannelMaskedEncoder(encoder, present)
    return zeroed, encoder


class _SlotBound(ChannelBoundEncoder):
    """Bound to ``channels`` unnamed slots (per-slot channel embeddings)."""

    def __init__(self, encoder: Encoder, channels: int) -> None:
        super().__init__(encoder, [f"slot{i}" for i in range(channels)])

    def forward(self, x: Tensor, **kwargs: Any) -> EncoderOutput:  # type: ignore[override]
        return self.encoder(x, **kwargs)


def _every_channel(data: D) -> D:
    """``data`` read again with every channel kept when it was averaged but its config names the
    channels (what a channel-adaptive encoder reads), else ``data`` itself."""
    if data.channel_names is None and data.source is not None and configured_channel_names(data.source):
        return load_eval_data(data.source, None)  # type: ignore[return-value]
    return data


def _named(data: EvalData) -> bool:
    """Whether ``data`` names its channels, or its ``eval_data`` config does (read again to keep them)."""
    return bool(data.channel_names or (data.source and configured_channel_names(data.source)))


def _names_option(data_cfg: dict[str, Any]) -> str:
    """The ``eval_data`` option that names a set's channels."""
    return "eval_data.modalities" if data_cfg.get("kind") == "brats" else "eval_data.channel_names"


def _check(
    wanted: Sequence[str], names: Sequence[str] | None, dataset: str, option: str, names_option: str
) -> list[str]:
    """``wanted`` spelt as in ``names`` (matched case-insensitively); raises a ``ValueError`` naming
    ``option``, the name and the available names for a name ``names`` lacks, or when ``names`` is None."""
    if names is None:
        raise ValueError(
            f"{option}={list(wanted)}: {dataset} does not name its channels; set {names_option} "
            "(one name per image channel)"
        )
    lower = [n.lower() for n in names]
    out = []
    for w in wanted:
        if str(w).lower() not in lower:
            raise ValueError(
                f"{option}: {w!r} is not a channel of {dataset}; its channels are {list(names)} ({names_option})"
            )
        out.append(names[lower.index(str(w).lower())])
    if not out:
        raise ValueError(f"{option} must name at least one channel")
    return out


def _keyed(ctx: EvalContext, channels: Sequence[str] | None) -> EvalContext:
    """``ctx`` with the channel subset in its feature-cache key (``None``: unchanged)."""
    return ctx if channels is None else replace(ctx, dataset_key=f"{ctx.dataset_key}-{subset_label(channels)}")


def _map_images(data: D, fn: Callable[[Any], Any], names: Sequence[str]) -> D:
    """``data`` with ``fn`` applied to every image's channel axis first (``(C, *S)`` arrays of segmentation
    items; ``(C, N, *S)`` views of classification tensors) and ``names`` as its channel names."""
    if isinstance(data, ClassificationData):
        images = {s: fn(x.transpose(0, 1)).transpose(0, 1).contiguous() for s, x in data.images.items()}
        return replace(data, images=images, channel_names=list(names))  # type: ignore[return-value]
    items = {s: [(fn(img), lab) for img, lab in split] for s, split in data.items.items()}
    return replace(data, items=items, channel_names=list(names))  # type: ignore[return-value]


def _zero(image: Any, absent: Sequence[int]) -> Any:
    """A copy of ``image`` ``(C, ...)`` (numpy or torch) with channels ``absent`` set to 0."""
    out = image.clone() if isinstance(image, Tensor) else image.copy()
    out[list(absent)] = 0
    return out
