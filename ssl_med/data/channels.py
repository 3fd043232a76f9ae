"""Channel identity and modality dropout for multi-sequence images (T1/T1ce/T2/FLAIR, multi-phase CT).

What travels with a crop (:class:`~ssl_med.data.crops.RandomCropDataset`) and its batch:

* ``"channel_names"``: the store's per-channel names of the crop's image (ingest writes them: BraTS
  ``_t1 _t1ce _t2 _flair`` suffixes, ``--channel-names`` for files that name none), **one string per sample**
  joined with ``|`` (``"t1|t1ce|t2|flair"``), so that any ``DataLoader`` collates it to a list of
  ``B`` strings (a list of names would be transposed by torch's default collate); read it back with
  :func:`batch_channel_names`. Absent when the crop's channels are not the image's (averaged to grey
  or repeated by ``data.num_channels``).
* ``"channel_mask"``: ``(C,)`` bool, True where the channel is present (collated to ``(B, C)``),
  added when modality dropout is on (``data.channel_dropout > 0``).

Sequences missing from a case (``data.channels = [t1, t1ce, t2, flair]``): every crop is laid out in
that order by name (case-insensitive), whatever the order and number of the case's own channels
(ingest stacks a case folder's sequences in the order it finds: a case without T1ce has 3 channels);
a sequence the case lacks is a zero channel, marked absent in ``"channel_mask"`` and in
``"channel_available"`` ``(C,)`` (False: no ground truth either, so BM-MAE does not score its
reconstruction). Images with none of the sequences are left out. ``"channel_names"`` is then the
``data.channels`` list for every sample.

Modality dropout (``data.channel_dropout = p``): each channel of a sample is dropped independently
with probability ``p``, deterministically from ``(seed, index)``; when every channel would go, one
of them, drawn uniformly, is kept, so a sample never loses all its channels
(:func:`draw_channel_keep`; only sequences the case has are kept). Dropped channels are **zero-filled** in the image (they normalise to 0,
also for raw ``data.normalise=batch`` crops), which is all a fixed-channel encoder (ViT, Mamba,
xLSTM) sees of the dropout: a missing sequence is a black channel, as in the zero-filling baselines
of missing-modality MRI work. Channel-adaptive encoders (ChAda-ViT) and the ViT with per-modality
tokens also get the mask and leave the dropped channels out altogether (:func:`encoder_channel_kwargs`). A view transform that reconstructs
dropped channels (BM-MAE) sets ``keeps_dropped_channels = True`` and receives them un-zeroed, with
the mask.

Names the store made up for unnamed channels (``ch0``, ``ch1``, ...) are not identities: such an
image is handed to the encoder without names (per-slot channel embeddings).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor

log = logging.getLogger(__name__)

NAMES_KEY = "channel_names"
MASK_KEY = "channel_mask"
AVAILABLE_KEY = "channel_available"
#: separator of the names in one sample's ``channel_names`` string
SEPARATOR = "|"
#: keys the view transforms carry from the crop to their views (views of one sample share its channels)
CHANNEL_KEYS = (NAMES_KEY, MASK_KEY, AVAILABLE_KEY)
#: the name readers give the one channel of a greyscale image (PNG, DICOM, MedMNIST): it says the image
#: has one intensity channel, not what kind, so an encoder without a vocabulary row for it uses its
#: per-slot embedding without a warning (the right embedding for an image with nothing to name)
GRAY = "gray"
_PLACEHOLDER = re.compile(r"^ch\d+$")
_warned: set[str] = set()


def encode_names(names: Sequence[str]) -> str:
    """One sample's channel names as one string (``|`` inside a name becomes ``/``)."""
    return SEPARATOR.join(str(n).replace(SEPARATOR, "/") for n in names)


def is_placeholder(names: Sequence[str]) -> bool:
    """True when the names are the store's stand-ins for unnamed channels (``ch0``, ``ch1``, ...)."""
    return not names or any(_PLACEHOLDER.match(str(n)) for n in names)


def batch_channel_names(batch: Mapping[str, Any]) -> list[list[str]] | None:
    """The per-image channel names of a collated batch (``B`` lists), or ``None`` when it has none."""
    value = batch.get(NAMES_KEY)
    if value is None:
        return None
    if isinstance(value, str):  # one uncollated sample
        value = [value]
    return [str(v).split(SEPARATOR) if v else [] for v in value]


def draw_channel_keep(
    rng: np.random.Generator, channels: int, p: float, available: np.ndarray | None = None
) -> np.ndarray:
    """``(C,)`` bool: the channels a sample keeps under modality dropout with probability ``p``.

    Each channel is dropped independently with probability ``p``; if all would be dropped, one
    channel drawn uniformly is kept (a sample never loses every channel). With ``available`` ``(C,)``
    (the sequences the image has), only those can be kept, and one of them always is.
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"data.channel_dropout must be in [0, 1), got {p}")
    avail = np.ones(channels, dtype=bool) if available is None else np.asarray(available, dtype=bool)
    if not avail.any():
        raise ValueError("an image without any of the wanted channels")
    keep = (rng.random(channels) >= p) & avail
    if not keep.any():
        keep[int(rng.choice(np.flatnonzero(avail)))] = True
    return keep


def zero_fill(crop: np.ndarray, keep: np.ndarray, fill: np.ndarray | None = None) -> np.ndarray:
    """``crop`` ``(C, *S)`` with the channels not in ``keep`` ``(C,)`` set to ``fill`` ``(C,)``
    (0 for normalised crops; for raw crops a value that normalises to 0)."""
    out = np.array(crop, copy=True)
    for c in np.flatnonzero(~keep):
        out[c] = 0 if fill is None else fill[c]
    return out


def channel_positions(names: Sequence[str], wanted: Sequence[str]) -> list[int | None]:
    """For each of ``wanted`` (case-insensitive), its index in an image's channel ``names``, or ``None``
    when the image lacks it (a sequence missing from that case's protocol)."""
    lower = [str(n).strip().lower() for n in names]
    return [lower.index(w.strip().lower()) if w.strip().lower() in lower else None for w in wanted]


def align_channels(
    crop: np.ndarray, positions: Sequence[int | None], window: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """An image's crop ``(C_img, *S)`` in the order of ``data.channels``: ``(len(positions), *S)``, a
    channel the image lacks zero-filled (raw crops: given the window ``[1, 2]`` and the value 0, which
    normalise to 0). Returns the crop, the window ``(C, 2)`` (``None`` for normalised crops) and
    ``available`` ``(C,)`` bool (the image has that sequence)."""
    available = np.array([p is not None for p in positions])
    out = np.zeros((len(positions), *crop.shape[1:]), dtype=crop.dtype)
    out_window = None if window is None else np.tile(np.array([1.0, 2.0], dtype=window.dtype), (len(positions), 1))
    for c, p in enumerate(positions):
        if p is not None:
            out[c] = crop[p]
            if out_window is not None:
                out_window[c] = window[p]
    return out, out_window, available


def carry_channel_keys(sample: Mapping[str, Any], views: dict[str, Any]) -> dict[str, Any]:
    """``views`` plus the sample's channel keys (for view transforms that build a new dict)."""
    return {**views, **{k: sample[k] for k in CHANNEL_KEYS if k in sample}}


def channel_names_for(encoder: Any, names: list[list[str]] | None, batch: int) -> list[list[str] | None] | None:
    """Names an encoder can use, per image: an image's names when the encoder knows every one of them
    (``encoder.knows_channel``), else ``None`` for that image (per-slot embeddings); unknown real
    names are reported once, naming the option that adds them (``backbone.channel_vocab``); a lone
    :data:`GRAY` channel is not (it names no kind of channel to learn)."""
    if names is None:
        return None
    if len(names) != batch:
        raise ValueError(f"{len(names)} channel-name entries for a batch of {batch}")
    knows = getattr(encoder, "knows_channel", None)
    out: list[list[str] | None] = []
    for image_names in names:
        if is_placeholder(image_names):
            out.append(None)
            continue
        unknown = [n for n in image_names if knows is not None and not knows(n)]
        if unknown:
            key = ",".join(sorted(unknown))
            if key not in _warned and unknown != [GRAY]:
                _warned.add(key)
                log.warning(
                    "channel names %s are not in the encoder's channel vocabulary: those images get per-slot "
                    "channel embeddings; add the names to backbone.channel_vocab to give them their own", unknown
                )
            out.append(None)
            continue
        out.append(list(image_names))
    return out if any(n is not None for n in out) else None


def encoder_channel_kwargs(encoder: Any, batch: Mapping[str, Any], repeat: int = 1) -> dict[str, Any]:
    """The channel keywords of ``encoder(x, ...)`` for a collated ``batch`` whose images were stacked
    ``repeat`` times view-major (``torch.cat([view_1, view_2])``: DINO's crops, graph matching's pair).

    A fixed-channel encoder (``encoder.in_chans`` set) gets no names: its channels are its input
    slots. One that fuses the channels in its patch embedding gets nothing (it sees the zero-filled
    channels); one with a token per (channel, patch) (``encoder.tokens_per_channel``: the ViT with
    ``channel_tokens=per_modality``) gets the ``channel_padding_mask`` under modality dropout. A
    channel-adaptive one gets ``channel_names`` (names it knows, see :func:`channel_names_for`) and,
    with modality dropout, ``channel_padding_mask`` ``(B * repeat, C)`` (True = missing).
    """
    mask = batch.get(MASK_KEY)
    if getattr(encoder, "in_chans", None) is not None:
        if mask is None or not getattr(encoder, "tokens_per_channel", False):
            return {}
        return {"channel_padding_mask": (~mask.bool()).repeat(repeat, 1)}
    kwargs: dict[str, Any] = {}
    size = None if mask is None else int(mask.shape[0])
    names = batch_channel_names(batch)
    if names is not None:
        resolved = channel_names_for(encoder, names, len(names))
        if resolved is not None:
            kwargs["channel_names"] = resolved * repeat
    if mask is not None:
        kwargs["channel_padding_mask"] = (~mask.bool()).repeat(repeat, 1)
    if size is not None and names is not None and size != len(names):
        raise ValueError(f"channel_mask has {size} rows but channel_names {len(names)}")
    return kwargs


def present_channels(batch: Mapping[str, Any], images: Tensor) -> Tensor:
    """``(B, C)`` bool: the channels present in each image (all, without modality dropout)."""
    mask = batch.get(MASK_KEY)
    if mask is None:
        return torch.ones(images.shape[:2], dtype=torch.bool, device=images.device)
    return mask.to(device=images.device, dtype=torch.bool)
