"""Multiscale pyramids for browsing: lower-resolution copies of an image beside its level 0.

Levels ``1, 2, ...`` halve the in-plane axes (Y, X) each time, and Z too once its voxels are no
coarser than twice the in-plane ones (an isotropic volume halves every axis; a volume of thick slices
keeps its slices until the in-plane voxels have caught up). Levels stop when no spatial axis exceeds
:data:`MIN_EDGE`. Images are averaged over each 2x2(x2) block, label maps keep every second voxel
(values stay valid labels). The levels are only for viewers (napari, OME-Zarr readers): training,
crops and every reader of :class:`~ssl_med.data.store.ImageStore` read level 0, which is never altered.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

THRESHOLD = 256  # ``pyramid=None`` (auto) builds levels when some spatial axis is longer than this
MIN_EDGE = 256  # no further level once every spatial axis is at most this long
FORCED_MIN_EDGE = 64  # the same with ``pyramid=True`` (asked for, so smaller images get levels too)
MAX_LEVELS = 8


def levels_for(shape: Sequence[int], spacing: Sequence[float], pyramid: bool | None) -> list[tuple[int, ...]]:
    """The levels (:func:`plan`) an image ``(C, *spatial)`` gets: none for ``pyramid=False``; for
    ``None`` (auto) levels down to :data:`MIN_EDGE` when some spatial axis exceeds :data:`THRESHOLD`;
    for ``True`` levels down to :data:`FORCED_MIN_EDGE` whatever the size."""
    if pyramid is None:
        return plan(shape, spacing) if max(shape[1:]) > THRESHOLD else []
    return plan(shape, spacing, FORCED_MIN_EDGE) if pyramid else []


def plan(shape: Sequence[int], spacing: Sequence[float], min_edge: int = MIN_EDGE) -> list[tuple[int, ...]]:
    """Per-level downsampling factors (cumulative, one per spatial axis) of the levels after level 0.

    ``shape`` is ``(C, *spatial)`` and ``spacing`` its voxel size per spatial axis. Levels stop once
    no spatial axis is longer than ``min_edge`` (none when the image is that small already).
    """
    size = [int(s) for s in shape[1:]]
    step = [float(s) for s in spacing]
    factors = [1] * len(size)
    levels: list[tuple[int, ...]] = []
    while max(size) > min_edge and len(levels) < MAX_LEVELS:
        plane = min(step[-2:])
        halve = [size[i] > 1 and (i >= len(size) - 2 or step[i] < 2 * plane) for i in range(len(size))]
        if not any(halve):
            break
        for i, h in enumerate(halve):
            if h:
                size[i], step[i], factors[i] = -(-size[i] // 2), step[i] * 2, factors[i] * 2
        levels.append(tuple(factors))
    return levels


def _step(factors: Sequence[int], previous: Sequence[int]) -> tuple[int, ...]:
    return tuple(f // p for f, p in zip(factors, previous))


def downsample_mean(array: np.ndarray, step: Sequence[int]) -> np.ndarray:
    """Mean over blocks of ``step`` voxels per spatial axis of ``array`` ``(C, *spatial)``; odd edges
    are padded by repeating the last voxel. Integer images are rounded back to their dtype."""
    pad = [(0, 0)] + [(0, -s % k) for s, k in zip(array.shape[1:], step)]
    padded = np.pad(array, pad, mode="edge") if any(p for _, p in pad) else array
    split = [array.shape[0]]
    for s, k in zip(padded.shape[1:], step):
        split += [s // k, k]
    blocks = padded.reshape(split).astype(np.float64 if array.dtype.itemsize > 4 else np.float32)
    out = blocks.mean(axis=tuple(range(2, len(split), 2)))
    if array.dtype.kind in "iub":
        info = np.iinfo(array.dtype) if array.dtype.kind != "b" else None
        out = np.rint(out)
        if info is not None:
            out = np.clip(out, info.min, info.max)
    return out.astype(array.dtype)


def downsample_labels(labels: np.ndarray, step: Sequence[int]) -> np.ndarray:
    """Every ``step``-th voxel per spatial axis of a label map ``(1, *spatial)`` (labels are not averaged)."""
    return labels[(slice(None), *(slice(None, None, k) for k in step))]


def levels(array: np.ndarray, factors: Sequence[tuple[int, ...]], labels: bool = False) -> list[np.ndarray]:
    """The arrays of the levels ``factors`` (from :func:`plan`) of ``array`` ``(C, *spatial)``, each
    computed from the one before."""
    out: list[np.ndarray] = []
    previous: tuple[int, ...] = (1,) * (array.ndim - 1)
    current = array
    for f in factors:
        step = _step(f, previous)
        current = downsample_labels(current, step) if labels else downsample_mean(current, step)
        out.append(current)
        previous = f
    return out


def expected_shape(shape: Sequence[int], factors: Sequence[int]) -> tuple[int, ...]:
    """Shape of the level with cumulative ``factors`` of an image of ``shape`` ``(C, *spatial)``."""
    size = [int(s) for s in shape[1:]]
    return (int(shape[0]), *(-(-s // f) for s, f in zip(size, factors)))
