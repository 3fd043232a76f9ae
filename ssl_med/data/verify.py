"""``ssl_med ingest --verify``: check that a store's manifest, arrays, OME metadata and chunks agree.

With ``read_data`` every chunk of every array is read through the store's checked read path, so
each missing (listed in the array's inventory but absent), truncated or corrupted (checksum
mismatch, undecodable) chunk is reported by image and chunk key (:mod:`ssl_med.data.integrity`).
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass, field

import numpy as np

from ssl_med.data import ome, pyramid
from ssl_med.data.integrity import ChunkError, ChunkInventory, UnverifiableStoreWarning, storage_chunks
from ssl_med.data.store import IMAGES_GROUP, ImageMeta, ImageStore

MAX_CHUNKS_LISTED = 5  # per array; the rest are counted


@dataclass
class VerifyReport:
    """``problems`` make a store unusable; ``warnings`` do not (e.g. arrays left by an interrupted ingest)."""

    checked: int = 0
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    damaged: set[str] = field(default_factory=set)  # names of the images a problem touches (for --repair)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        head = f"{self.checked} images checked: {'OK' if self.ok else f'{len(self.problems)} problems'}"
        return "\n".join(
            [head, *(f"  problem: {p}" for p in self.problems), *(f"  warning: {w}" for w in self.warnings)]
        )


def verify(path: str, read_data: bool = True) -> VerifyReport:
    """Check every manifest entry: array present, shape/dtype as listed, OME metadata, label maps;
    with ``read_data`` also read every chunk of every array (see the module docstring)."""
    store = ImageStore(path)
    report = VerifyReport()
    arrays: dict[str, dict[int | None, str]] = {}  # array path -> {stack row or None: image name}
    for name, meta in store.manifest.items():
        report.checked += 1
        try:
            arr = store.array(name)
        except KeyError:
            report.problems.append(f"{name}: array {store.array_path(name)} is missing")
            report.damaged.add(name)
            continue
        shape = tuple(arr.shape[1:]) if meta.index is not None else tuple(arr.shape)
        if shape != tuple(meta.shape):
            report.problems.append(f"{name}: array shape {shape}, manifest says {meta.shape}")
            report.damaged.add(name)
            continue
        arrays.setdefault(store.array_path(name), {})[meta.index] = name
        if meta.index is None and store.version >= 2:
            attrs = dict(store.root[f"{IMAGES_GROUP}/{name}"].attrs)
            bad_attrs = ome.check_image_attrs(attrs, arr.shape)
            report.problems += [f"{name}: {p}" for p in bad_attrs]
            if bad_attrs:
                report.damaged.add(name)
            else:
                check_levels(store, f"{IMAGES_GROUP}/{name}", attrs, meta, report, arrays)
        for label in meta.label_maps:
            try:
                lab = store.root[store.label_path(name, label)]
            except KeyError:
                report.problems.append(f"{name}: label map {label!r} is missing")
                report.damaged.add(name)
                continue
            if tuple(lab.shape[1:]) != tuple(meta.shape[1:]):
                report.problems.append(f"{name}: label map {label!r} has shape {lab.shape}")
                report.damaged.add(name)
                continue
            arrays[store.label_path(name, label)] = {None: name}
            group = store.label_path(name, label).rsplit("/", 1)[0]
            check_levels(store, group, dict(store.root[group].attrs), meta, report, arrays)
    if read_data:
        unverifiable = 0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UnverifiableStoreWarning)  # reported below, once
            for array_path, images in arrays.items():
                problems, verifiable = check_chunks(store, array_path, images, report.damaged)
                report.problems += problems
                unverifiable += not verifiable
        if unverifiable:
            report.warnings.append(
                f"{unverifiable} arrays have no chunk inventory or no checksums: lost or altered chunks "
                "cannot be detected there (re-ingest the store to add them)"
            )
    orphans = sorted(set(store.stored_names()) - set(store.manifest))
    if orphans:
        report.warnings.append(
            f"{len(orphans)} image arrays not in the manifest (interrupted ingest? re-run it): {', '.join(orphans[:5])}"
        )
    return report


def check_levels(
    store: ImageStore,
    group: str,
    attrs: dict,
    meta: ImageMeta,
    report: VerifyReport,
    arrays: dict[str, dict[int | None, str]],
) -> None:
    """Check the downsampled levels ``1, 2, ...`` that the NGFF metadata of image (or label) group
    ``group`` lists: each present with the shape its downsampling gives; their chunks are then read
    like level 0's (added to ``arrays``). Levels are for viewers, so a bad one damages the image only
    as far as a re-ingest is the way to rewrite it."""
    name = group.split("/")[1]
    channels = int(store.root[f"{group}/{ome.LEVEL0}"].shape[0])
    for k, factors in enumerate(ome.level_factors(attrs, meta.spacing), start=1):
        path = f"{group}/{k}"
        expected = pyramid.expected_shape((channels, *meta.shape[1:]), factors)
        try:
            shape = tuple(store.root[path].shape)
        except KeyError:
            report.problems.append(f"{name}: pyramid level {path} is missing")
            report.damaged.add(name)
            continue
        if shape != expected:
            report.problems.append(f"{name}: pyramid level {path} has shape {shape}, expected {expected}")
            report.damaged.add(name)
            continue
        arrays[path] = {None: name}


def check_chunks(
    store: ImageStore, path: str, images: dict[int | None, str], damaged: set[str] | None = None
) -> tuple[list[str], bool]:
    """Read every chunk of the array at ``path`` (holding ``images``: ``{stack row or None: name}``).

    Returns the problems, one per bad chunk (the first :data:`MAX_CHUNKS_LISTED`, then a count), and
    whether the array can be verified at all (has an inventory and checksums). The names of the images
    a bad chunk belongs to are added to ``damaged``.
    """
    damaged = set() if damaged is None else damaged
    arr = store.root[path]
    try:
        verifiable = ChunkInventory.of(arr) is not None
    except ValueError as exc:
        damaged.update(images.values())
        return [f"{_owners(images, 0, 0)}: {path}: {exc}"], False
    verifiable = verifiable and "crc32c" in str(arr.metadata.to_dict()["codecs"])
    chunks = storage_chunks(arr)
    problems: list[str] = []
    any_finite = arr.dtype.kind != "f" or None not in images  # stack rows were checked at ingest
    for index in itertools.product(*(range(math.ceil(s / c)) for s, c in zip(arr.shape, chunks))):
        region = tuple(slice(i * c, min((i + 1) * c, s)) for i, c, s in zip(index, chunks, arr.shape))
        try:
            data = store.read_array(path, region)
        except ChunkError as exc:
            damaged.update(_owner_names(images, index[0], chunks[0]))
            problems.append(
                f"{_owners(images, index[0], chunks[0])}: chunk {exc.key} of {path} is {exc.kind} ({exc.detail})"
            )
            continue
        any_finite = any_finite or bool(np.isfinite(data).any())
    if not any_finite and not problems:
        damaged.update(images.values())
        problems.append(f"{_owners(images, 0, 0)}: no finite values")
    if len(problems) > MAX_CHUNKS_LISTED:
        problems[MAX_CHUNKS_LISTED:] = [
            f"{_owners(images, 0, 0)}: {len(problems) - MAX_CHUNKS_LISTED} more bad chunks in {path}"
        ]
    return problems, verifiable


def _owner_names(images: dict[int | None, str], first_axis_chunk: int, rows_per_chunk: int) -> list[str]:
    """The image(s) a chunk belongs to: the image, or the stack rows of chunk ``first_axis_chunk``."""
    if None in images:
        return [images[None]]
    rows = range(first_axis_chunk * rows_per_chunk, (first_axis_chunk + 1) * rows_per_chunk)
    return [images[r] for r in rows if r in images] or sorted(images.values())


def _owners(images: dict[int | None, str], first_axis_chunk: int, rows_per_chunk: int) -> str:
    names = _owner_names(images, first_axis_chunk, rows_per_chunk)
    return ", ".join(names[:3]) + (f" (+{len(names) - 3} more)" if len(names) > 3 else "")
