"""One resampling rule for crops and evaluation images, so that pretraining and evaluation see one geometry.

:func:`resize` scales a batch ``(N, C, *S)`` to a size: ``area`` averaging when every axis shrinks (no
aliasing of speckle or thin vessels), bilinear / trilinear interpolation with half-pixel centres when any
axis grows, ``nearest`` for label maps. The evaluators read every labelled image through it
(:mod:`ssl_med.evaluators.datasets`), and the crop sampler scales an image that is smaller or larger than the
crop through :func:`resize_crop` (:mod:`ssl_med.data.crops`, ``data.small_images`` / ``data.large_images``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F


def resize(images: torch.Tensor, size: Sequence[int], mode: str = "area") -> torch.Tensor:
    """Resize ``(N, C, *S)`` to ``(N, C, *size)`` (``area`` for images, ``nearest`` for labels); ``area``
    becomes bilinear / trilinear where any axis grows."""
    size = tuple(int(s) for s in size)
    if tuple(images.shape[2:]) == size:
        return images
    if mode == "area" and any(s > t for s, t in zip(size, images.shape[2:])):
        mode = "bilinear" if images.ndim == 4 else "trilinear"
    kwargs = {"align_corners": False} if mode in ("bilinear", "trilinear") else {}
    return F.interpolate(images, size=size, mode=mode, **kwargs)


def resize_crop(crop: np.ndarray, size: Sequence[int]) -> np.ndarray:
    """``(C, *S)`` -> ``(C, *size)`` by :func:`resize`, in the crop's dtype (integers rounded)."""
    x = torch.from_numpy(np.ascontiguousarray(crop, dtype=np.float32))[None]
    out = resize(x, size)[0].numpy()
    return out.round().astype(crop.dtype) if crop.dtype.kind in "iu" else out.astype(crop.dtype, copy=False)
