"""Random crops read straight from the chunks of an :class:`~ssl_med.data.store.ImageStore`.

A crop is drawn deterministically from ``(seed, index)``: the image (weighted by its number of
positions of the region read, :meth:`RandomCropDataset.window`, so large volumes are sampled more and
every distinct region equally often), for 2D crops from a volume the slice along
``slice_axis``, and the crop origin. Only the chunks that the crop touches are read.

Foreground-aware sampling (``min_foreground > 0``) redraws the crop's *position within the same
image*, deterministically from ``(seed, index, attempt)``, while less than that fraction of its voxels
is above ``foreground_threshold`` (after normalisation to ``[0, 1]``), i.e. skips crops that are
mostly air; after ``max_tries`` the most foreground-rich attempt is used. The image is never
redrawn, so images keep their sampling weight however sparse their foreground is; the bias that
remains is within an image, towards foreground-rich positions.

Images smaller than the crop along a crop axis (e.g. 28 px MedMNIST images under a 32 px crop) are,
with ``small_images="resize"`` (default), read whole along that axis and scaled up isotropically
(bilinear / trilinear) until they cover the crop, so a model never trains on padding; ``"pad"``
keeps the old behaviour (padded at the end with what normalises to 0) and ``"error"`` refuses them
at start-up, naming the image. Images larger than the crop along every crop axis are cropped at full
resolution (``large_images="crop"``, default: the CT / MRI workflow), or with ``"resize"`` scaled down
isotropically until they just cover the crop, a square image becoming exactly the crop: where an image is
the region of interest (MedMNIST+ at 64-224 px), pretraining then sees whole images at the scale the
evaluators read them, not a fraction of one at a larger scale. Both scale through
:func:`ssl_med.data.resample.resize_crop`, the evaluators' rule.

``split="auto"`` trains on the ``train`` split when the store has one (MedMNIST files keep their
splits at ingest), so that val and test images never enter pretraining by default.

Where the crops are normalised (``normalise=``): ``"worker"`` hands float32 ``[0, 1]`` crops to the
view transform inside the DataLoader worker; ``"batch"`` hands the stored values (e.g. int16, half
the bytes of float32) with their intensity window through the worker -> main-process hand-off, and
:func:`~ssl_med.data.intensity.normalise_batch` finishes them after the transfer (on the accelerator in
training). The hand-off is the costliest step of loading a 96³ crop on a small machine (docs/benchmarks/data.md), so
``"batch"`` is used with objectives whose views only move voxels (:attr:`Objective.geometric_views`).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, Literal

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler, get_worker_info

from ssl_med.data.channels import (
    AVAILABLE_KEY,
    MASK_KEY,
    NAMES_KEY,
    align_channels,
    channel_positions,
    draw_channel_keep,
    encode_names,
    zero_fill,
)
from ssl_med.data.faults import FaultPolicy
from ssl_med.data.intensity import intensity_window, normalise_intensity, zero_value
from ssl_med.data.resample import resize_crop
from ssl_med.data.store import ImageMeta, ImageStore

log = logging.getLogger(__name__)


def resolve_split(split: str | None, metas: Iterable[ImageMeta]) -> str | None:
    """``"auto"`` -> ``"train"`` when any image is in the train split, else ``None`` (all images)."""
    if split != "auto":
        return split
    return "train" if any(m.split == "train" for m in metas) else None


def match_channels(crop: np.ndarray, num_channels: int | None) -> np.ndarray:
    """Adapt ``(C, ...)`` to ``num_channels``: mean to 1 channel, or repeat 1 channel; ``None`` keeps C."""
    c = crop.shape[0]
    if num_channels is None or c == num_channels:
        return crop
    if num_channels == 1:
        return crop.mean(axis=0, keepdims=True)
    if c == 1:
        return np.repeat(crop, num_channels, axis=0)
    raise ValueError(f"cannot map a {c}-channel image to {num_channels} channels")


class RandomCropDataset(Dataset):
    """Random ``crop_size`` crops from an image store, as ``{"image": (C, *crop_size) float32, ...}``.

    Args:
        store_path: path/URL of the store (opened lazily in each worker process).
        crop_size: one size per spatial axis of the crop (2 or 3 values).
        num_channels: channels the model expects (see :func:`match_channels`); ``None`` keeps them.
        slice_axis: for 2D crops from 3D volumes, the axis the slice is taken along (0 = Z, axial).
        length: nominal number of crops per epoch.
        seed: crops are a function of ``(seed, index)``.
        split: only images of this split (``None``: all; ``"auto"``: ``train`` when the store has it, else all).
        transform: per-sample callable applied last (the objective's view transform).
        min_foreground: minimum fraction of foreground voxels per crop (0: no check).
        foreground_threshold: normalised intensity above which a voxel is foreground.
        max_tries: crops drawn at most per sample when ``min_foreground > 0``.
        return_channel_names: add ``"channel_names"`` to each sample: the store's names joined with
            ``|``, one string per sample (``""`` when the crop's channels were averaged or repeated by
            ``num_channels``) (:mod:`ssl_med.data.channels`; channel-adaptive backbones read them).
        channel_dropout: modality dropout, the probability of dropping each channel of a sample
            (never all of them); dropped channels are zero-filled and ``"channel_mask"`` ``(C,)``
            (True = present) is added (:mod:`ssl_med.data.channels`).
        channels: channel names to lay every crop out by (``[t1, t1ce, t2, flair]``): a case that lacks
            one gets a zero channel there, with ``"channel_mask"`` and ``"channel_available"`` False
            (:func:`ssl_med.data.channels.align_channels`); images with none of them are left out.
            ``num_channels`` must then be ``None`` or ``len(channels)``.
        engine: store read engine (``"auto"``, ``"direct"``, ``"zarr"``; see :class:`ImageStore`).
        normalise: ``"worker"`` (float32 ``[0, 1]`` crops) or ``"batch"`` (stored values plus
            ``"intensity_window"`` ``(C, 2)``; finish with :func:`~ssl_med.data.intensity.normalise_batch`;
            the transform must not depend on intensities; averaging channels to ``num_channels=1`` needs normalised
            values, so it is refused) or ``"auto"`` (``"batch"`` unless channels are averaged).
        on_error: a sample whose chunks cannot be read: ``"raise"`` the error naming image and chunk,
            or ``"skip"`` it (drawn again, counted, logged; see :mod:`ssl_med.data.faults`).
        max_error_fraction: with ``on_error="skip"``, the fraction of draws that may fail before
            :class:`~ssl_med.data.faults.TooManyFaults` stops the run.

        small_images: ``"resize"``, ``"pad"`` or ``"error"`` for images smaller than the crop
            (see the module docstring).
        large_images: ``"crop"`` or ``"resize"`` for images larger than the crop along every crop axis
            (see the module docstring).
        window_mode: what each image's values are scaled to ``[0, 1]`` from: ``"image"`` (its own
            percentiles), ``"dtype"`` (its integer dtype's range) or ``"auto"`` (see
            :func:`~ssl_med.data.intensity.intensity_window`).
    """

    def __init__(
        self,
        store_path: str | os.PathLike[str],
        crop_size: Sequence[int],
        num_channels: int | None = 1,
        slice_axis: int = 0,
        length: int = 1024,
        seed: int = 0,
        split: str | None = None,
        transform: Callable[[dict[str, Any]], dict[str, Any]] | None = None,
        min_foreground: float = 0.0,
        foreground_threshold: float = 0.05,
        max_tries: int = 10,
        return_channel_names: bool = False,
        channel_dropout: float = 0.0,
        channels: Sequence[str] | None = None,
        engine: str = "auto",
        normalise: Literal["auto", "worker", "batch"] = "worker",
        on_error: str = "raise",
        max_error_fraction: float = 0.05,
        small_images: Literal["resize", "pad", "error"] = "resize",
        large_images: Literal["crop", "resize"] = "crop",
        window_mode: Literal["auto", "image", "dtype"] = "image",
    ) -> None:
        self.store_path = str(store_path)
        self.crop_size = tuple(int(c) for c in crop_size)
        if not self.crop_size or min(self.crop_size) <= 0:
            raise ValueError(f"crop size {list(self.crop_size)} (data.crop_size): every size must be a positive integer")
        if small_images not in ("resize", "pad", "error"):
            raise ValueError(f"small_images (data.small_images) must be resize, pad or error, got {small_images!r}")
        self.small_images = small_images
        if large_images not in ("crop", "resize"):
            raise ValueError(f"large_images (data.large_images) must be crop or resize, got {large_images!r}")
        self.large_images = large_images
        self.spatial_dims = len(self.crop_size)
        self.num_channels = num_channels
        self.slice_axis = slice_axis
        self.length = length
        self.seed = seed
        self.transform = transform
        self.min_foreground = min_foreground
        self.foreground_threshold = foreground_threshold
        self.max_tries = max(1, max_tries)
        self.return_channel_names = return_channel_names
        if not 0.0 <= channel_dropout < 1.0:
            raise ValueError(f"channel_dropout (data.channel_dropout) must be in [0, 1), got {channel_dropout}")
        self.channel_dropout = channel_dropout
        self.engine = engine
        self.faults = FaultPolicy(on_error, max_error_fraction)
        manifest = ImageStore(self.store_path).manifest
        split = resolve_split(split, manifest.values())
        self.split = split
        self.names = [
            n
            for n, m in manifest.items()
            if (split is None or m.split == split) and m.spatial_dims >= self.spatial_dims
        ]
        if not self.names:
            raise ValueError(
                f"store {self.store_path} has no {self.spatial_dims}D-compatible images"
                + (f" in split {split!r}" if split else "")
            )
        self.metas = [manifest[n] for n in self.names]
        self.channels = [str(c) for c in channels] if channels else None
        if self.channels is not None:
            if num_channels not in (None, len(self.channels)):
                raise ValueError(
                    f"data.channels lists {len(self.channels)} sequences {self.channels}: set data.num_channels "
                    f"to {len(self.channels)} (or null), not {num_channels}"
                )
            self.num_channels = len(self.channels)
            usable = [any(p is not None for p in channel_positions(m.channel_names, self.channels)) for m in self.metas]
            if not any(usable):
                raise ValueError(f"no image of {self.store_path} has any of the channels {self.channels} (data.channels)")
            if not all(usable):
                log.warning("%d images have none of the channels %s: left out", usable.count(False), self.channels)
            self.names = [n for n, u in zip(self.names, usable) if u]
            self.metas = [m for m, u in zip(self.metas, usable) if u]
        #: ``(C, 2)`` intensity window of each image, in the order of ``names``
        self.intensity_windows = []
        for name, meta in zip(self.names, self.metas):
            try:
                self.intensity_windows.append(intensity_window(meta, window_mode))
            except ValueError as err:
                raise ValueError(f"image {name!r} of {self.store_path}: {err}") from None
        averaged = num_channels == 1 and any(m.shape[0] > 1 for m in self.metas)
        if normalise == "auto":
            normalise = "worker" if averaged else "batch"
        if normalise not in ("worker", "batch"):
            raise ValueError(f"normalise must be 'auto', 'worker' or 'batch', got {normalise!r}")
        if normalise == "batch" and averaged:
            raise ValueError("normalise='batch' cannot average channels to num_channels=1; use 'worker'")
        self.normalise = normalise
        #: one dtype for every raw crop so that they collate (``normalise="batch"``)
        self.raw_dtype = np.result_type(*(np.dtype(m.dtype or "float32") for m in self.metas))
        self._position = {n: k for k, n in enumerate(self.names)}
        #: the extent read from each image (:meth:`window`), fixed for the dataset's life: computed once
        self.windows = [self.window(m) for m in self.metas]
        weights = np.array([self._num_positions(k) for k in range(len(self.metas))], dtype=np.float64)
        self.weights = weights / weights.sum()
        self._check_image_sizes()
        self._store: ImageStore | None = None
        self._pid: int | None = None

    def _plane(self, meta: ImageMeta) -> tuple[int, ...]:
        """The image's size along the crop axes (the slice axis dropped for 2D crops of volumes)."""
        spatial = meta.shape[1:]
        if meta.spatial_dims > self.spatial_dims:
            return tuple(s for i, s in enumerate(spatial) if i != self.slice_axis)
        return tuple(spatial)

    def _check_image_sizes(self) -> None:
        """Refuse (``"error"``) or report (``"resize"``, ``"pad"``) images smaller than the crop, and report
        images scaled down to it (``large_images="resize"``), once."""
        self._check_small_images()
        if self.large_images != "resize":
            return
        large = [(n, self._plane(m)) for n, m in zip(self.names, self.metas) if self._scale(m) < 1]
        if large:
            name, plane = large[0]
            log.info(
                "%d of %d images are larger than the crop %s (e.g. %s: %s): scaled down to cover it, whole where "
                "square (data.large_images=resize)", len(large), len(self.names), list(self.crop_size), name, list(plane),
            )

    def _check_small_images(self) -> None:
        """Refuse (``"error"``) or report (``"resize"``, ``"pad"``) images smaller than the crop, once."""
        small = [(n, self._plane(m)) for n, m in zip(self.names, self.metas) if any(s < c for s, c in zip(self._plane(m), self.crop_size))]
        if not small:
            return
        name, plane = small[0]
        what = f"{len(small)} of {len(self.names)} images are smaller than the crop {list(self.crop_size)} (e.g. {name}: {list(plane)})"
        if self.small_images == "error":
            raise ValueError(f"{what} in store {self.store_path}; set data.small_images=resize or pad, or a smaller data.crop_size")
        if self.small_images == "resize":
            log.info("%s: scaled up to cover the crop (data.small_images=resize)", what)
        else:
            padding = np.mean([1 - math.prod(min(s, c) for s, c in zip(p, self.crop_size)) / math.prod(self.crop_size) for _, p in small])
            log.warning("%s: padded, %.0f%% of their crops is padding (data.small_images=pad)", what, 100 * padding)

    def _num_positions(self, k: int) -> int:
        """Crop positions of an image (its sampling weight): slices times positions of the region read
        (:meth:`window`), so that every distinct region of the store is drawn equally often."""
        meta = self.metas[k]
        n_slices = meta.shape[1:][self.slice_axis] if meta.spatial_dims > self.spatial_dims else 1
        return n_slices * math.prod(max(s - w, 0) + 1 for s, w in zip(self._plane(meta), self.windows[k]))

    @property
    def store(self) -> ImageStore:
        """The store handle of this process (re-opened after a fork: zarr handles are not fork-safe)."""
        if self._store is None or self._pid != os.getpid():
            if get_worker_info() is not None:  # one decoding thread per DataLoader worker
                from numcodecs import blosc

                blosc.set_nthreads(1)
            self._store, self._pid = ImageStore(self.store_path, engine=self.engine), os.getpid()
        return self._store

    def __len__(self) -> int:
        return self.length

    def _scale(self, meta: ImageMeta) -> float:
        """The isotropic factor that makes the image just cover the crop: > 1 for an image smaller than the
        crop along some axis, < 1 for one larger along every axis."""
        return max(c / s for s, c in zip(self._plane(meta), self.crop_size))

    def window(self, meta: ImageMeta) -> tuple[int, ...]:
        """The extent read along each crop axis: the crop, or the part of the image that scales
        (isotropically) to exactly cover the crop, for a too-small image with ``small_images="resize"`` and
        a larger one with ``large_images="resize"``."""
        scale = self._scale(meta)
        if not ((scale > 1 and self.small_images == "resize") or (scale < 1 and self.large_images == "resize")):
            return self.crop_size
        return tuple(min(s, math.ceil(c / scale - 1e-9)) for s, c in zip(self._plane(meta), self.crop_size))

    def region(self, index: int, attempt: int = 0) -> tuple[str, tuple[slice, ...]]:
        """The image name and the spatial region (in store coordinates) of crop ``index``.

        Attempts of one draw (``attempt // max_tries`` equal) share the image of their first attempt
        and differ in position only.
        """
        rng = np.random.default_rng([self.seed, index] + ([attempt] if attempt else []))
        first = attempt - attempt % self.max_tries
        image_rng = rng if attempt == first else np.random.default_rng([self.seed, index] + ([first] if first else []))
        k = int(image_rng.choice(len(self.names), p=self.weights))
        meta = self.metas[k]
        spatial = list(meta.shape[1:])
        region: list[slice] = []
        crop = list(self.windows[k])
        if meta.spatial_dims > self.spatial_dims:
            z = int(rng.integers(spatial[self.slice_axis]))
            crop.insert(self.slice_axis, 1)
        for axis, (size, c) in enumerate(zip(spatial, crop)):
            if meta.spatial_dims > self.spatial_dims and axis == self.slice_axis:
                region.append(slice(z, z + 1))
                continue
            start = int(rng.integers(max(size - c, 0) + 1))
            region.append(slice(start, min(start + c, size)))
        return self.names[k], tuple(region)

    def _crop(self, index: int, attempt: int) -> tuple[np.ndarray, int]:
        """Crop ``(C, *crop_region)`` of attempt ``attempt`` of sample ``index`` (normalised in ``"worker"``
        mode) and the position of its image in ``names``."""
        name, region = self.region(index, attempt)
        k = self._position[name]
        meta = self.metas[k]
        crop = self.store.read(name, region)
        if meta.spatial_dims > self.spatial_dims:
            crop = crop.squeeze(1 + self.slice_axis)
        if self.windows[k] != self.crop_size:
            crop = resize_crop(crop, self.crop_size)
        if self.normalise == "worker":
            return normalise_intensity(crop, self.intensity_windows[k]), k
        return crop.astype(self.raw_dtype, copy=False), k

    def _foreground_fraction(self, crop: np.ndarray, k: int) -> float:
        """Fraction of voxels above ``foreground_threshold`` (normalised) in any channel."""
        if not crop.size:
            return 0.0
        if self.normalise == "worker":
            return float((crop.max(axis=0) > self.foreground_threshold).mean())
        window = self.intensity_windows[k].astype(np.float64)  # the same test in stored units
        lo, width = window[:, 0], np.maximum(window[:, 1] - window[:, 0], 1e-6)
        cut = (lo + self.foreground_threshold * width).reshape(-1, *([1] * (crop.ndim - 1)))
        return float((crop > cut).any(axis=0).mean())

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.faults.sample(index, self._sample)

    def _sample(self, index: int, redraw: int = 0) -> dict[str, Any]:
        """Sample ``index``; ``redraw > 0`` draws it anew (crop attempts from their own random streams)."""
        first = redraw * self.max_tries
        crop, k = self._crop(index, first)
        if self.min_foreground > 0:
            best, best_fraction = (crop, k), -1.0
            for attempt in range(self.max_tries):
                if attempt:
                    crop, k = self._crop(index, first + attempt)
                fraction = self._foreground_fraction(crop, k)
                if fraction >= self.min_foreground:
                    best = (crop, k)
                    break
                if fraction > best_fraction:
                    best, best_fraction = (crop, k), fraction
            crop, k = best
        crop, window, channel_keys = self._channel_layout(crop, k, index, redraw)
        sample: dict[str, Any] = {"image": torch.from_numpy(self._padded(crop, window))}
        if window is not None:
            sample["intensity_window"] = torch.from_numpy(window)
        sample.update(channel_keys)
        if self.transform is None:
            return sample
        from monai.data import MetaTensor  # here, not at import: keeps DataLoader worker start-up short
        from monai.transforms import Randomizable

        if isinstance(self.transform, Randomizable):  # views depend on (seed, index) only, not on workers
            self.transform.set_random_state(
                seed=int(np.random.default_rng([self.seed, index, 1]).integers(2**31))
            )
        return {
            k: v.as_tensor() if isinstance(v, MetaTensor) else v for k, v in self.transform(sample).items()
        }

    def _channel_layout(
        self, crop: np.ndarray, k: int, index: int, redraw: int
    ) -> tuple[np.ndarray, np.ndarray | None, dict[str, Any]]:
        """The crop's channels as the model sees them (aligned by name to ``channels``, else matched to
        ``num_channels``), after modality dropout, with the raw crop's window (``None`` when
        normalised) and the sample's channel keys (:mod:`ssl_med.data.channels`)."""
        meta = self.metas[k]
        window = self.intensity_windows[k] if self.normalise == "batch" else None
        available = None
        if self.channels is not None:
            crop, window, available = align_channels(crop, channel_positions(meta.channel_names, self.channels), window)
            names = encode_names(self.channels)
        else:
            own = self.num_channels is None or crop.shape[0] == self.num_channels
            crop = match_channels(crop, self.num_channels)
            window = None if window is None else match_channels(window, self.num_channels)
            names = encode_names(meta.channel_names) if own else ""  # "": the names do not apply
        keep = available
        if self.channel_dropout > 0:
            rng = np.random.default_rng([self.seed, index, redraw, 2])
            keep = draw_channel_keep(rng, crop.shape[0], self.channel_dropout, available)
            if not getattr(self.transform, "keeps_dropped_channels", False):
                crop = zero_fill(crop, keep, zero_value(window, crop.dtype, len(crop)))
        keys: dict[str, Any] = {NAMES_KEY: names} if self.return_channel_names else {}  # every sample: collation
        if keep is not None:
            keys[MASK_KEY] = torch.from_numpy(keep)
        if available is not None:
            keys[AVAILABLE_KEY] = torch.from_numpy(available)
        return crop, window, keys

    def _padded(self, crop: np.ndarray, window: np.ndarray | None) -> np.ndarray:
        """``crop`` padded at the end of each axis to ``crop_size`` with what normalises to 0
        (:func:`zero_value`)."""
        if tuple(crop.shape[1:]) == self.crop_size:
            return np.ascontiguousarray(crop)
        fill = zero_value(window, crop.dtype, len(crop))
        out = np.empty((len(crop), *self.crop_size), dtype=crop.dtype)
        out[...] = fill.reshape(-1, *([1] * self.spatial_dims)).astype(crop.dtype)
        out[(slice(None), *(slice(0, s) for s in crop.shape[1:]))] = crop
        return out


class EpochSampler(Sampler[int]):
    """Crop indices that continue across epochs and resumes, sharded without overlap across ranks.

    Each pass yields ``length / world_size`` indices starting at ``offset()``, the number of samples
    the whole job has consumed so far (``global_step * batch_size * world_size``), so a resumed run
    continues with exactly the crops it would have drawn, and every epoch draws new ones.
    Rank ``r`` takes ``offset + r, offset + r + world_size, ...``.
    """

    def __init__(
        self, length: int, rank: int = 0, world_size: int = 1, offset: Callable[[], int] = lambda: 0
    ) -> None:
        self.length, self.rank, self.world_size = length, rank, world_size
        self.offset = offset

    def __len__(self) -> int:
        return len(range(self.rank, self.length, self.world_size))

    def __iter__(self) -> Iterator[int]:
        base = self.offset()
        return iter(range(base + self.rank, base + self.length, self.world_size))
