"""Zarr-chunked image store: one array per image, ``(C, Z, Y, X)`` volumes and ``(C, Y, X)`` images.

Layout (zarr v3 group, store version 2)::

    store.zarr/
      zarr.json                   {"ssl_med": {"version": 2, "images": manifest},
                                   "ome": {"bioformats2raw.layout": 3}}  (an OME-Zarr 0.5 collection)
      OME/                        {"ome": {"series": ["images/<name>", ...]}}  the collection's images
      images/<name>/              an OME-Zarr 0.5 image group: {"ome": multiscales, omero; "ssl_med": ImageMeta}
        0/                        level 0, (C, Z, Y, X) or (C, Y, X), chunked, Blosc-compressed
        1/, 2/, ...               downsampled levels for viewers (large images; never read for training)
        labels/                   {"ome": {"labels": ["seg", ...]}}  (only when the image has label maps)
          seg/0/                  (1, Z, Y, X) integer label map, an OME-Zarr label image (+ its levels)
      stacks/<name>/              (N, C, *spatial): many small images of one shape (MedMNIST) in few chunks
                                  (ssl_med's own arrays, not OME-Zarr images)

The manifest in the group attributes lists every image with its shape, spacing, modality, channel
names, split and (for stacks) its row, so samplers plan crops without opening each array. Crops read
only the chunks they touch: through the ``direct`` chunk reader for local unsharded arrays (fastest,
see :mod:`ssl_med.data.chunkread`), through zarr-python otherwise (sharded arrays, fsspec URLs such as
``s3://bucket/store.zarr``, ``memory://...``). Stores of version 1 (arrays at ``images/<name>``) are
still read.

Every chunk carries a CRC-32C and every array the inventory of the chunks it wrote, so both engines
raise :class:`~ssl_med.data.integrity.ChunkError` naming the image and chunk for a missing, truncated
or corrupted chunk (:mod:`ssl_med.data.integrity`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from ssl_med.data import ome
from ssl_med.data import pyramid as _pyramid
from ssl_med.data.chunkread import ChunkReader
from ssl_med.data.integrity import ChunkError, read_zarr, record_inventory, warn_unverifiable
from ssl_med.data.layout import DEFAULT_LAYOUT, Layout
from ssl_med.data.stats import intensity_stats, stack_intensity_stats

STORE_VERSION = 2
IMAGES_GROUP = "images"
STACKS_GROUP = "stacks"
LABELS_GROUP = "labels"
ENGINES = ("auto", "direct", "zarr")


@dataclass
class ImageMeta:
    """Per-image metadata kept in the manifest and in the image group's attributes.

    Attributes:
        shape: array shape ``(C, *spatial)``.
        spacing: voxel/pixel size per spatial axis (``Z, Y, X`` or ``Y, X``) in ``unit``.
        modality: e.g. ``"MR"``, ``"CT"``, ``"fundus"``, ``"histology"``.
        channel_names: one name per channel.
        source: where the image came from (path or package resource).
        split: ``"train"``, ``"val"``, ``"test"`` or ``""``.
        intensity: per-channel statistics of the stored values, ``{"p0.5", "p99.5", "mean", "std",
            "min", "max": [one per channel]}`` (for CT, ``min``/``max`` is the HU range).
        label: optional class label(s) for labelled stores (MedMNIST).
        unit: physical unit of ``spacing`` (UDUNITS, ``"millimeter"``), ``""`` when unknown (photos).
        origin: physical position of voxel 0 per spatial axis, or ``None``.
        orientation: axis codes of the stored voxel axes ``(x, y, z)`` after reorientation, e.g. ``"RAS"``.
        affine: 4x4 voxel ``(x, y, z)`` -> world (RAS, mm) affine of the stored array, or ``None``.
        original_affine: the source file's affine before reorientation/resampling, or ``None``.
        label_maps: names of the label maps stored beside the image (``labels/<name>``).
        dtype: numpy dtype of the stored values.
        array: path of the level-0 array inside the store (``""``: ``images/<name>/0``).
        index: row of this image in a stack array, or ``None``.
        preprocessing: what ingest did (reorientation, resampling, HU clipping), and per-modality
            normalisation recorded for the loaders (raw values stay raw).
        extra: free-form source metadata (subject/session ids, DICOM series UID, ...).
        content_hash: ``"sha256:<hex>"`` of the source files the image was read from, by which ingest
            recognises an input it already holds (:mod:`ssl_med.data.identity`); ``""`` when unknown.
    """

    shape: tuple[int, ...]
    spacing: tuple[float, ...]
    modality: str = ""
    channel_names: tuple[str, ...] = ()
    source: str = ""
    split: str = ""
    intensity: dict[str, list[float]] = field(default_factory=dict)
    label: list[int] | None = None
    unit: str = "millimeter"
    origin: tuple[float, ...] | None = None
    orientation: str = ""
    affine: list[list[float]] | None = None
    original_affine: list[list[float]] | None = None
    label_maps: tuple[str, ...] = ()
    dtype: str = ""
    array: str = ""
    index: int | None = None
    preprocessing: dict[str, Any] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    content_hash: str = ""

    @property
    def spatial_dims(self) -> int:
        return len(self.shape) - 1

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ImageMeta:
        known = {f.name for f in fields(cls)}
        d = {k: v for k, v in d.items() if k in known}  # newer stores may carry more keys
        d["shape"] = tuple(d["shape"])
        d["spacing"] = tuple(d["spacing"])
        d["channel_names"] = tuple(d.get("channel_names", ()))
        d["label_maps"] = tuple(d.get("label_maps", ()))
        if d.get("origin") is not None:
            d["origin"] = tuple(d["origin"])
        return cls(**d)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready copy (shallow per field: ``dataclasses.asdict`` is too slow for 10⁵ images)."""
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        for key in ("shape", "spacing", "channel_names", "label_maps"):
            d[key] = list(d[key])
        if d["origin"] is not None:
            d["origin"] = list(d["origin"])
        d["intensity"] = {k: list(v) for k, v in self.intensity.items()}
        d["preprocessing"], d["extra"] = dict(self.preprocessing), dict(self.extra)
        return d


_DEFAULTS = ImageMeta(shape=(), spacing=()).to_dict()


def _compact(d: dict[str, Any]) -> dict[str, Any]:
    """``d`` without the fields that hold their default value (``from_dict`` restores them)."""
    return {k: v for k, v in d.items() if k in ("shape", "spacing") or v != _DEFAULTS.get(k)}


def default_chunks(shape: Sequence[int]) -> tuple[int, ...]:
    """Chunks of :data:`~ssl_med.data.layout.DEFAULT_LAYOUT` for an image ``(C, *spatial)``."""
    return DEFAULT_LAYOUT.chunks(shape)


def check_image(name: str, array: np.ndarray, spacing: Sequence[float], channel_names: Sequence[str]) -> None:
    """Raise ``ValueError`` with the reason if ``array`` ``(C, *spatial)`` cannot be stored."""
    if array.ndim not in (3, 4):
        raise ValueError(f"image {name!r}: expected (C, Y, X) or (C, Z, Y, X), got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"image {name!r}: zero-size array {array.shape}")
    if len(spacing) != array.ndim - 1:
        raise ValueError(f"image {name!r}: {array.ndim - 1} spatial axes but spacing {tuple(spacing)}")
    if array.dtype.kind == "f" and not np.isfinite(array).any():
        raise ValueError(f"image {name!r}: no finite values (all NaN/inf)")
    if array.dtype.kind not in "biuf":
        raise ValueError(f"image {name!r}: unsupported dtype {array.dtype}")
    if channel_names and len(channel_names) != array.shape[0]:
        raise ValueError(
            f"image {name!r}: {array.shape[0]} channels but channel names {tuple(channel_names)}"
        )


def _fill_value(array: np.ndarray, modality: str) -> float:
    """Background value of unwritten chunks: air (the minimum) for CT, 0 otherwise."""
    if modality.upper() == "CT" and array.size:
        return float(np.nanmin(array))
    return 0


class ImageStore:
    """A zarr v3 group of images with a manifest.

    Args:
        path: local path or fsspec URL of the store (``s3://...``, ``memory://...``).
        mode: ``"r"`` (read), ``"a"`` (create or append).
        engine: how regions are read: ``"direct"`` (chunk files decoded in a plain loop; local,
            unsharded arrays), ``"zarr"`` (zarr-python), ``"auto"`` (direct where possible).
        storage_options: passed to fsspec for URLs (credentials, endpoint, ...).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        mode: str = "r",
        engine: str = "auto",
        storage_options: dict[str, Any] | None = None,
    ) -> None:
        if engine not in ENGINES:
            raise ValueError(f"engine must be one of {ENGINES}, got {engine!r}")
        self.path = str(path)
        self.is_local = "://" not in self.path or self.path.startswith("file://")
        self.local_root = Path(self.path.removeprefix("file://")) if self.is_local else None
        if mode == "r" and self.local_root is not None and not self.local_root.exists():
            raise FileNotFoundError(f"no image store at {self.path}")
        self.engine = engine
        self.root = zarr.open_group(self.path, mode=mode, zarr_format=3, storage_options=storage_options)
        if mode != "r" and IMAGES_GROUP not in self.root:
            self.root.create_group(IMAGES_GROUP)
            self.root.attrs["ssl_med"] = {"version": STORE_VERSION, "images": {}}
        attrs = self.root.attrs.get("ssl_med", {})
        self.version = int(attrs.get("version", STORE_VERSION))
        self._manifest: dict[str, ImageMeta] = {
            name: ImageMeta.from_dict(d) for name, d in attrs.get("images", {}).items()
        }
        self._readers: dict[str, ChunkReader | None] = {}

    # -- manifest -------------------------------------------------------------------------------

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

    def record(self, metas: Mapping[str, ImageMeta], sort: bool = False) -> None:
        """Add already-written images to the manifest (one attribute write for all of them).

        ``sort=True`` orders the manifest by name, so crops drawn from a store ingested in parallel
        do not depend on the order in which workers finished.
        """
        if not metas and (not sort or list(self._manifest) == sorted(self._manifest)):
            return
        self._manifest.update(metas)
        if sort:
            self._manifest = dict(sorted(self._manifest.items()))
        self._write_manifest()

    def _write_manifest(self) -> None:
        """Write the manifest into the group attributes: compact JSON, default-valued fields left out
        (a MedMNIST-sized store of 10⁴ entries stays a few MB)."""
        attrs = dict(self.root.attrs.get("ssl_med", {}))
        attrs["version"] = self.version
        attrs["images"] = {n: _compact(m.to_dict()) for n, m in self._manifest.items()}
        series = [f"{IMAGES_GROUP}/{n}" for n, m in self._manifest.items() if m.index is None and not m.array]
        with zarr.config.set({"json_indent": None}):
            if series and self.version >= 2:  # an OME-Zarr collection of the image groups
                self.root.attrs.update({"ssl_med": attrs, **ome.collection_attrs()})
                group = self.root.require_group(ome.OME_GROUP)
                group.attrs.update(ome.series_attrs(series))
            else:
                self.root.attrs["ssl_med"] = attrs

    # -- writing --------------------------------------------------------------------------------

    def add(self, name: str, array: np.ndarray, spacing: Sequence[float], **kwargs: Any) -> ImageMeta:
        """Write ``array`` ``(C, *spatial)`` as image ``name`` (:meth:`write_image`, same keyword
        arguments) and record it in the manifest."""
        meta = self.write_image(name, array, spacing, **kwargs)
        self.record({name: meta})
        return meta

    def write_image(
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
        layout: Layout = DEFAULT_LAYOUT,
        labels: Mapping[str, np.ndarray] | None = None,
        unit: str = "millimeter",
        origin: Sequence[float] | None = None,
        orientation: str = "",
        affine: np.ndarray | None = None,
        original_affine: np.ndarray | None = None,
        preprocessing: dict[str, Any] | None = None,
        extra: dict[str, Any] | None = None,
        content_hash: str = "",
        pyramid: bool | None = None,
    ) -> ImageMeta:
        """Write image ``name`` (an OME-Zarr image group) without touching the manifest.

        ``array`` is ``(C, *spatial)``; each of ``labels`` is ``(*spatial)`` or ``(1, *spatial)``
        integer. ``pyramid`` adds downsampled levels for viewers (``None``: when the image is large,
        :func:`ssl_med.data.pyramid.levels_for`); level 0 holds ``array`` unchanged either way. Safe to
        call from several processes for different names (ingest workers); the parent then calls
        :meth:`record`.
        """
        names = tuple(channel_names) or tuple(f"ch{i}" for i in range(array.shape[0] if array.ndim else 0))
        check_image(name, array, spacing, names)
        labels = {k: np.asarray(v) for k, v in (labels or {}).items()}
        for key, lab in labels.items():
            lab_spatial = lab.shape[1:] if lab.ndim == array.ndim else lab.shape
            if tuple(lab_spatial) != array.shape[1:] or lab.dtype.kind not in "biu":
                raise ValueError(
                    f"image {name!r}: label map {key!r} {lab.shape} {lab.dtype} is not an integer map of shape {array.shape[1:]}"
                )
        stats = intensity_stats(array)
        meta = ImageMeta(
            shape=tuple(int(s) for s in array.shape),
            spacing=tuple(float(s) for s in spacing),
            modality=modality,
            channel_names=names,
            source=source,
            split=split,
            intensity=stats,
            label=label,
            unit=unit,
            origin=None if origin is None else tuple(float(o) for o in origin),
            orientation=orientation,
            affine=None if affine is None else np.asarray(affine, dtype=float).tolist(),
            original_affine=None
            if original_affine is None
            else np.asarray(original_affine, dtype=float).tolist(),
            label_maps=tuple(labels),
            dtype=str(array.dtype),
            preprocessing=dict(preprocessing or {}),
            extra=dict(extra or {}),
            content_hash=content_hash,
        )
        levels = _pyramid.levels_for(array.shape, meta.spacing, pyramid)
        group = self.root.create_group(f"{IMAGES_GROUP}/{name}", overwrite=True)
        windows = list(zip(stats["p0.5"], stats["p99.5"]))
        group.attrs.update(ome.image_attrs(name, meta.spacing, meta.origin, unit, names, windows, levels))
        self._write_levels(group, array, levels, chunks, layout, modality)
        if labels:
            label_root = group.create_group(LABELS_GROUP)
            label_root.attrs.update(ome.labels_group_attrs(list(labels)))
            for key, lab in labels.items():
                lab = lab if lab.ndim == array.ndim else lab[None]
                lab = lab.astype(np.uint8 if lab.min() >= 0 and lab.max() < 256 else np.int32)
                sub = label_root.create_group(key)
                values = [int(v) for v in np.unique(lab)]
                sub.attrs.update(ome.label_image_attrs(key, meta.spacing, meta.origin, unit, values, levels))
                self._write_levels(sub, lab, levels, None, layout, "", labels=True)
        group.attrs["ssl_med"] = meta.to_dict()
        return meta

    @staticmethod
    def _write_levels(
        group: zarr.Group,
        array: np.ndarray,
        levels: Sequence[tuple[int, ...]],
        chunks: Sequence[int] | None,
        layout: Layout,
        modality: str,
        labels: bool = False,
    ) -> None:
        """Write ``array`` as level ``0`` of ``group`` (``chunks`` or the layout's), then its downsampled
        levels ``1, 2, ...`` (factors ``levels``; label maps strided, images averaged)."""
        for k, data in enumerate([array, *_pyramid.levels(array, levels, labels=labels)]):
            level = group.create_array(
                str(k),
                shape=data.shape,
                dtype=data.dtype,
                chunks=tuple(chunks if k == 0 and chunks else layout.chunks(data.shape)),
                shards=layout.shards(data.shape),
                compressors=layout.compressors(),
                fill_value=_fill_value(array, modality),
                dimension_names=ome.dimension_names(data.ndim - 1),
                overwrite=True,
            )
            level[...] = data
            record_inventory(level)

    def write_stack(
        self,
        name: str,
        images: np.ndarray,
        spacing: Sequence[float],
        *,
        names: Sequence[str],
        labels: Sequence[list[int] | None] | None = None,
        split: str = "",
        modality: str = "",
        channel_names: Sequence[str] = (),
        source: str = "",
        unit: str = "",
        layout: Layout = DEFAULT_LAYOUT,
        extra: dict[str, Any] | None = None,
        content_hash: str = "",
    ) -> dict[str, ImageMeta]:
        """Write ``images`` ``(N, C, *spatial)`` as one stack array; one manifest entry per row.

        Small images of one shape (MedMNIST) are packed ~1 MiB per chunk instead of one array each,
        which would mean millions of tiny files. Returns ``{name: ImageMeta}`` for :meth:`record`.
        """
        if images.ndim not in (4, 5) or len(names) != images.shape[0]:
            raise ValueError(
                f"stack {name!r}: expected (N, C, *spatial) with N={len(names)} names, got {images.shape}"
            )
        chans = tuple(channel_names) or tuple(f"ch{i}" for i in range(images.shape[1]))
        for i in (0, len(names) - 1):  # one dtype and shape for all rows: the ends stand for the rest
            check_image(names[i], images[i], spacing, chans)
        if images.dtype.kind == "f":
            finite = np.isfinite(images.reshape(len(names), -1)).any(axis=1)
            if not finite.all():
                raise ValueError(f"image {names[int(np.argmin(finite))]!r}: no finite values (all NaN/inf)")
        path = f"{STACKS_GROUP}/{name}"
        arr = self.root.create_array(
            path,
            shape=images.shape,
            dtype=images.dtype,
            chunks=layout.stack_chunks(images.shape, images.dtype.itemsize),
            compressors=layout.compressors(),
            fill_value=0,
            dimension_names=["n", *ome.dimension_names(images.ndim - 2)],
            overwrite=True,
        )
        arr[...] = images
        record_inventory(arr)
        metas = {}
        stats = stack_intensity_stats(images)
        for i, row in enumerate(images):
            metas[names[i]] = ImageMeta(
                shape=tuple(int(s) for s in row.shape),
                spacing=tuple(float(s) for s in spacing),
                modality=modality,
                channel_names=chans,
                source=source,
                split=split,
                intensity=stats[i],
                label=None if labels is None else labels[i],
                unit=unit,
                dtype=str(images.dtype),
                array=path,
                index=i,
                extra=dict(extra or {}),
                content_hash=content_hash,
            )
        arr.attrs["ssl_med"] = {"names": list(names), "split": split, "source": source}
        return metas

    # -- reading --------------------------------------------------------------------------------

    def array_path(self, name: str) -> str:
        """Path (inside the store) of the level-0 array holding image ``name``."""
        if name not in self._manifest:
            raise KeyError(f"no image {name!r} in {self.path}")
        meta = self._manifest[name]
        if meta.array:
            return meta.array
        return f"{IMAGES_GROUP}/{name}" if self.version < 2 else f"{IMAGES_GROUP}/{name}/{ome.LEVEL0}"

    def label_path(self, name: str, label: str) -> str:
        if label not in self.manifest[name].label_maps:
            raise KeyError(
                f"image {name!r} has no label map {label!r} (has {self.manifest[name].label_maps})"
            )
        return f"{IMAGES_GROUP}/{name}/{LABELS_GROUP}/{label}/{ome.LEVEL0}"

    def array(self, name: str) -> zarr.Array:
        """The zarr array of image ``name`` (lazy; for stack entries the whole ``(N, C, ...)`` stack)."""
        return self.root[self.array_path(name)]

    def _reader(self, path: str) -> ChunkReader | None:
        if path not in self._readers:
            usable = self.engine != "zarr" and self.local_root is not None
            self._readers[path] = reader = ChunkReader.open(self.local_root / path) if usable else None
            if reader is None and self.engine == "direct":
                raise ValueError(f"array {path} of {self.path} cannot be read with the direct engine")
            if reader is not None and reader.inventory is None:
                warn_unverifiable(self.path, "has no chunk inventory")
        return self._readers[path]

    def read_array(self, path: str, selection: tuple[slice, ...]) -> np.ndarray:
        """``selection`` (one slice per axis) of the array at ``path``, every chunk checked (raises
        :class:`~ssl_med.data.integrity.ChunkError`)."""
        reader = self._reader(path)
        if reader is not None:
            return reader.read(selection)
        return read_zarr(self.root[path], selection, path, self.path)

    def read(self, name: str, region: Sequence[slice] | None = None) -> np.ndarray:
        """Read ``region`` (slices over the spatial axes; all channels) of image ``name``: ``(C, *region)``."""
        meta = self._manifest.get(name)
        path = self.array_path(name)
        spatial = tuple(region) if region is not None else tuple(slice(None) for _ in meta.shape[1:])
        try:
            if meta.index is None:
                return self.read_array(path, (slice(None), *spatial))
            return self.read_array(path, (slice(meta.index, meta.index + 1), slice(None), *spatial))[0]
        except ChunkError as exc:
            raise exc.naming(name) from None

    def read_label(self, name: str, label: str = "seg", region: Sequence[slice] | None = None) -> np.ndarray:
        """Read ``region`` of label map ``label`` of image ``name``: ``(1, *region)`` integer."""
        path = self.label_path(name, label)
        spatial = (
            tuple(region) if region is not None else tuple(slice(None) for _ in self.manifest[name].shape[1:])
        )
        try:
            return self.read_array(path, (slice(None), *spatial))
        except ChunkError as exc:
            raise exc.naming(name) from None

    def total_voxels(self, name: str) -> int:
        return math.prod(self._manifest[name].shape[1:])

    def stored_names(self) -> list[str]:
        """Names of the image groups present under ``images/`` (in the manifest or not)."""
        if IMAGES_GROUP not in self.root:
            return []
        return sorted(k for k, _ in self.root[IMAGES_GROUP].members(max_depth=0))
