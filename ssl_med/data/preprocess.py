"""Geometry and intensity preprocessing at ingest: reorientation, resampling, HU clipping.

Volumes arrive in voxel order ``(C, I, J, K)`` with a voxel -> RAS affine. They are reoriented to
canonical axis codes (default ``RAS``: ``i`` runs to the Right, ``j`` Anterior, ``k`` Superior), a
pure axis permutation/flip with no interpolation, then optionally resampled to a target spacing with
MONAI's ``Spacing`` transform (trilinear for images, nearest for label maps), and finally transposed
to storage order ``(C, Z, Y, X) = (C, K, J, I)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class Geometry:
    """Storage-order geometry: ``spacing``/``origin`` per ``(Z, Y, X)``, ``affine`` voxel ``(i, j, k)`` -> RAS."""

    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    affine: np.ndarray
    orientation: str


def reorient(
    array: np.ndarray, affine: np.ndarray, labels: dict[str, np.ndarray], axcodes: str = "RAS"
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Flip/permute ``array`` ``(C, I, J, K)`` (and label maps ``(I, J, K)``) to ``axcodes``; new affine."""
    from nibabel import orientations as ornt

    current = ornt.io_orientation(affine)
    target = ornt.axcodes2ornt(tuple(axcodes))
    transform = ornt.ornt_transform(current, target)
    spatial = array.shape[1:]
    out = np.stack([ornt.apply_orientation(c, transform) for c in array])
    new_labels = {k: ornt.apply_orientation(v, transform) for k, v in labels.items()}
    new_affine = affine @ ornt.inv_ornt_aff(transform, spatial)
    return np.ascontiguousarray(out), new_affine, {k: np.ascontiguousarray(v) for k, v in new_labels.items()}


def resample(
    array: np.ndarray, affine: np.ndarray, labels: dict[str, np.ndarray], spacing_xyz: Sequence[float]
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """Resample to ``spacing_xyz`` (voxel order) with MONAI ``Spacing``; the dtype of ``array`` is kept."""
    import torch
    from monai.data import MetaTensor
    from monai.transforms import Spacing

    def run(x: np.ndarray, mode: str) -> tuple[np.ndarray, np.ndarray]:
        t = MetaTensor(
            torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)), affine=torch.as_tensor(affine)
        )
        out = Spacing(pixdim=tuple(float(s) for s in spacing_xyz), mode=mode, padding_mode="border")(t)
        return out.numpy(), out.affine.numpy().astype(np.float64)

    out, new_affine = run(array, "bilinear")
    if array.dtype.kind in "iu":
        info = np.iinfo(array.dtype)
        out = np.clip(np.rint(out), info.min, info.max)
    new_labels = {k: run(v[None], "nearest")[0][0].astype(v.dtype) for k, v in labels.items()}
    return out.astype(array.dtype), new_affine, new_labels


def to_storage(
    array: np.ndarray, affine: np.ndarray, labels: dict[str, np.ndarray]
) -> tuple[np.ndarray, dict[str, np.ndarray], Geometry]:
    """``(C, I, J, K)`` -> ``(C, K, J, I)`` = ``(C, Z, Y, X)``; label maps ``(1, Z, Y, X)``; the geometry."""
    from nibabel.orientations import aff2axcodes

    vox = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))  # spacing along i, j, k
    geometry = Geometry(
        spacing=tuple(float(s) for s in vox[::-1]),
        origin=tuple(float(o) for o in affine[:3, 3][::-1]),
        affine=affine,
        orientation="".join(aff2axcodes(affine)),
    )
    stored = np.ascontiguousarray(array.transpose(0, 3, 2, 1))
    stored_labels = {k: np.ascontiguousarray(v.transpose(2, 1, 0))[None] for k, v in labels.items()}
    return stored, stored_labels, geometry


def clip_hu(array: np.ndarray, window: Sequence[float]) -> np.ndarray:
    """Clip CT values to the HU ``window`` ``(low, high)``; the dtype is kept."""
    lo, hi = window
    return np.clip(array, lo, hi).astype(array.dtype, copy=False)
