"""Zarr-chunked image store: one array per image, ``(C, Z, Y, X)`` volumes and ``(C, Y, X)`` images.

Layout (zarr v3 group)::

    store.zarr/
      zarr.json                 group attributes: {"ssl_med": {"version", "images": manifest}}
      images/<name>/            one array per image, chunked, Blosc-zstd compressed
        zarr.json               attributes: {"ssl_med": ImageMeta}

The manifest in the group attributes lists every image with its shape, spacing, modality, channel
names and split, so samplers plan crops without opening each array. Crops read only the chunks they
touch (zarr slicing).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec

STORE_VERSION = 1
IMAGES_GROUP = "images"


@dataclass
class ImageMeta:
    """Per-image metadata kept in the manifest and in the array's attributes.

    Attributes:
        shape: array shape ``(C, *spatial)``.
        spacing: voxel/pixel size per spatial axis in mm (``Z, Y, X`` or ``Y, X``).
        modality: e.g. ``"MR"``, ``"CT"``, ``"fundus"``, ``"histology"``.
        channel_names: one name per channel.
        source: where the image came from (path or package resource).
        split: ``"train"``, ``"val"``, ``"test"`` or ``""``.
        intensity: per-channel statistics, ``{"p0.5": [...], "p99.5": [...], "mean": [...], "std": [...]}``.
        label: optional class label(s) for labelled stores.
    """

    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    modality: str = ""
    channel_names: tuple[str, ...] = ()
    source: str = ""
    split: str = ""
    intensity: dict[str, list[float]] = field(default_factory=dict)
    label: list[int] | None = None

    @property
    def spatial_dims(self) -> int:
        return len(self.shape) - 1

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ImageMeta:
        d = dict(d)
        d["shape"] = tuple(d["shape"])
        d["spacing"] = tuple(d["spacing"])
        d["channel_names"] = tuple(d.get("channel_names", ()))
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"], d["spacing"], d["channel_names"] = list(self.shape), list(self.spacing), list(self.channel_names)
        return d


def intensity_stats(array: np.ndarray) -> dict[str, list[float]]:
    """Per-channel robust statistics of ``(C, *spatial)`` (finite values only)."""
    stats: dict[str, list[float]] = {"p0.5": [], "p99.5": [], "mean": [], "std": []}
    for channel in array:
        values = channel[np.isfinite(channel)].astype(np.float64)
        if values.size > 2_000_000:  # a strided sample is plenty for percentiles
            values = values[:: values.size // 2_000_000]
        lo, hi = np.percentile(values, [0.5, 99.5]) if values.size else (0.0, 0.0)
        stats["p0.5"].append(float(lo))
        stats["p99.5"].append(float(hi))
        stats["mean"].append(float(values.mean()) if values.size else 0.0)
        stats["std"].append(float(values.std()) if values.size else 0.0)
    return stats


def default_chunks(shape: Sequence[int]) -> tuple[int, ...]:
    """One channel per chunk; 64 voxels per axis in 3D, 256 pixels per axis in 2D."""
    side = 64 if len(shape) == 4 else 256
    return (1, *(min(s, side) for s in shape[1:]))


class ImageStore:
    """A zarr v3 group of images with a manifest.

    Args:
        path: local path or fsspec URL of the store.
        mode: ``"r"`` (read), ``"a"`` (create or append).
    """

    def __init__(self, path: str | os.PathLike[str], mode: str = "r") -> None:
        self.path = str(path)
        if mode == "r" and "://" not in self.path and not Path(self.path).exists():
            raise FileNotFoundError(f"no image store at {self.path}")
        self.root = zarr.open_group(self.path, mode=mode, zarr_format=3)
        if mode != "r" and IMAGES_GROUP not in self.root:
            self.root.create_group(IMAGES_GROUP)
            self.root.attrs["ssl_med"] = {"version": STORE_VERSION, "images": {}}
        self._manifest: dict[str, ImageMeta] = {
            name: ImageMeta.from_dict(d) for name, d in self.root.attrs.get("ssl_med", {}).get("images", {}).items()
        }

    @property
    def manifest(self) -> dict[str, ImageMeta]:
        """``{name: ImageMeta}`` for every image, read from the group attributes."""
        return self._manifest

    def __len__(self) -> int:
        return len(self._manifest)

    def __iter__(self) -> Iterator[str]:
        return iter(self._manifest)

    def __contains__(self, name: object) -> bool:
        return name in self._manifest

    def add(
        self,
        name: str,
        array: np.ndarray,
        spacing: Sequence[float],
        *,
        modality: str = "",
        channel_names: Sequence[str] = (),
        source: str = "",
        split: str = "",
        label: list[int] | None = None,
        chunks: Sequence[int] | None = None,
    ) -> ImageMeta:
        """Write ``array`` ``(C, *spatial)`` as image ``name`` and record it in the manifest."""
        if array.ndim not in (3, 4):
            raise ValueError(f"image {name!r}: expected (C, Y, X) or (C, Z, Y, X), got shape {array.shape}")
        if len(spacing) != array.ndim - 1:
            raise ValueError(f"image {name!r}: {array.ndim - 1} spatial axes but spacing {tuple(spacing)}")
        if not np.isfinite(array).any():
            raise ValueError(f"image {name!r}: no finite values")
        names = tuple(channel_names) or tuple(f"ch{i}" for i in range(array.shape[0]))
        if len(names) != array.shape[0]:
            raise ValueError(f"image {name!r}: {array.shape[0]} channels but channel names {names}")
        meta = ImageMeta(
            shape=tuple(int(s) for s in array.shape),
            spacing=tuple(float(s) for s in spacing),
            modality=modality,
            channel_names=names,
            source=source,
            split=split,
            intensity=intensity_stats(array),
            label=label,
        )
        arr = self.root.create_array(
            f"{IMAGES_GROUP}/{name}",
            shape=array.shape,
            dtype=array.dtype,
            chunks=tuple(chunks or default_chunks(array.shape)),
            compressors=BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"),
            overwrite=True,
        )
        arr[...] = array
        arr.attrs["ssl_med"] = meta.to_dict()
        self._manifest[name] = meta
        self._write_manifest()
        return meta

    def _write_manifest(self) -> None:
        attrs = dict(self.root.attrs.get("ssl_med", {}))
        attrs["version"] = STORE_VERSION
        attrs["images"] = {n: m.to_dict() for n, m in self._manifest.items()}
        self.root.attrs["ssl_med"] = attrs

    def array(self, name: str) -> zarr.Array:
        """The zarr array of image ``name`` (lazy: nothing is read until sliced)."""
        if name not in self._manifest:
            raise KeyError(f"no image {name!r} in {self.path}")
        return self.root[f"{IMAGES_GROUP}/{name}"]

    def read(self, name: str, region: Sequence[slice] | None = None) -> np.ndarray:
        """Read ``region`` (slices over the spatial axes; all channels) of image ``name``."""
        arr = self.array(name)
        if region is None:
            return arr[...]
        return arr[(slice(None), *region)]

    def total_voxels(self, name: str) -> int:
        return math.prod(self._manifest[name].shape[1:])
