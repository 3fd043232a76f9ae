"""Intensity windows: the stored values each channel of an image maps to ``[0, 1]``, and the scaling itself.

A crop is scaled by its image's window (:func:`intensity_window`: the image's own 0.5/99.5 percentiles that
ingest records, or its integer dtype's range), either in the DataLoader worker (:func:`normalise_intensity`)
or after the worker -> main-process hand-off on a whole batch (:func:`normalise_batch`), which carries the
stored values (half the bytes of float32 for int16) with their windows. The evaluators scale their images
the same way (:mod:`ssl_med.evaluators.datasets`).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ssl_med.data.stats import percentile_window
from ssl_med.data.store import ImageMeta

INTENSITY_WINDOWS = ("auto", "image", "dtype")


def intensity_window(meta: ImageMeta, mode: str = "image") -> np.ndarray:
    """``(C, 2)`` float32: the stored values each channel of an image maps to 0 and 1.

    ``mode``:

    * ``"image"``: the image's own 0.5 and 99.5 percentiles, recorded at ingest: a per-image contrast
      stretch, the usual reading of MRI, whose intensities have no fixed unit.
    * ``"dtype"``: the full range of the image's integer dtype (0-255 for ``uint8``): every image on
      one scale, so that brightness itself is kept (X-ray opacity, ultrasound echogenicity), as
      torchvision and timm read 8-bit images and as the MedMNIST evaluators read them (``/ 255``).
    * ``"auto"``: ``"dtype"`` for 8-bit images (PNG, JPEG, MedMNIST), ``"image"`` otherwise.
    """
    if mode not in INTENSITY_WINDOWS:
        raise ValueError(f"data.intensity_window must be one of {', '.join(INTENSITY_WINDOWS)}, got {mode!r}")
    dtype = np.dtype(meta.dtype or "float32")
    if mode == "auto":
        mode = "dtype" if dtype.itemsize == 1 and dtype.kind in "iu" else "image"
    if mode == "image":
        return percentile_window(meta.intensity)
    if dtype.kind not in "iu":
        raise ValueError(
            f"data.intensity_window=dtype needs integer images, this one is stored as {dtype} (use image or auto)"
        )
    info = np.iinfo(dtype)
    return np.tile(np.array([info.min, info.max], dtype=np.float32), (meta.shape[0], 1))


def normalise_intensity(crop: np.ndarray, window: np.ndarray) -> np.ndarray:
    """Scale each channel of ``crop`` ``(C, *S)`` to ``[0, 1]`` by its ``window`` ``(C, 2)``
    (:func:`intensity_window`), clipped; NaN -> 0."""
    window = window.reshape(-1, 2, *([1] * (crop.ndim - 1)))
    lo, hi = window[:, 0], window[:, 1]
    out = crop.astype(np.float32)  # in place from here on: this runs once per crop in the workers
    out -= lo
    out /= np.maximum(hi - lo, 1e-6)
    np.clip(out, 0.0, 1.0, out=out)
    if crop.dtype.kind == "f":
        np.nan_to_num(out, copy=False, nan=0.0)
    return out


def normalise_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """Finish a batch of raw crops (``normalise="batch"``); a batch without a window is returned as is.

    ``image`` ``(B, C, *spatial)`` in the stored dtype and ``intensity_window`` ``(B, C, 2)`` ->
    ``image`` float32 in ``[0, 1]`` (clipped, NaN -> 0), the same values as :func:`normalise_intensity`;
    the window is removed. Runs wherever the batch is (CPU, or the GPU after the transfer).
    """
    if "intensity_window" not in batch:
        return batch
    batch = dict(batch)
    window = batch.pop("intensity_window").float()
    image = batch["image"]
    shape = (*window.shape[:2], *([1] * (image.ndim - 2)))
    lo, hi = window[..., 0].reshape(shape), window[..., 1].reshape(shape)
    scale = 1.0 / (hi - lo).clamp_min(1e-6)
    out = torch.addcmul(-lo * scale, image.float(), scale).clamp_(0.0, 1.0)  # one fused pass + clamp
    batch["image"] = out.nan_to_num_(nan=0.0) if image.is_floating_point() else out
    return batch


def zero_value(window: np.ndarray | None, dtype: np.dtype, channels: int) -> np.ndarray:
    """``(C,)`` stored values that normalise to exactly 0: 0 for normalised crops (``window`` ``None``);
    for raw crops with ``window`` ``(C, 2)`` one below the floor of the window's low end (clipped to
    exactly 0 by :func:`normalise_batch`, whatever the float rounding at the low end), within ``dtype``'s
    range. Used for padding and for dropped channels."""
    if window is None:
        return np.zeros(channels)
    value = np.floor(window[:, 0]) - 1
    if np.dtype(dtype).kind in "iu":
        info = np.iinfo(dtype)
        value = np.clip(value, info.min, info.max)
    return value
