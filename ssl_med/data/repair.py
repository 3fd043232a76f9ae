"""``ssl_med ingest --verify --repair``: re-ingest the images ``--verify`` found damaged from their sources.

Every manifest entry records the ``source`` an image was read from and the ``content_hash`` of its
files (:mod:`ssl_med.data.identity`). An image is repaired when that source still exists and still
hashes to the recorded digest: it is read again with the preprocessing its entry records
(reorientation, resampling, HU clip, modality, split) into arrays chunked like the damaged ones, and
written over them under the same name. Otherwise it is reported as not repairable, with the reason
(source gone, source changed, nothing recorded). A stack row (MedMNIST) is repaired by rewriting its
whole stack from the source.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace

from ssl_med.data import ome
from ssl_med.data.identity import source_digest
from ssl_med.data.ingest import IngestOptions, _write_record, _write_stack
from ssl_med.data.layout import DEFAULT_LAYOUT, Layout
from ssl_med.data.readers import Source, StackRecord, read_source
from ssl_med.data.readers.discover import discover
from ssl_med.data.store import IMAGES_GROUP, ImageMeta, ImageStore
from ssl_med.data.verify import VerifyReport
from ssl_med.data.writer_lock import exclusive_writer


@dataclass
class RepairReport:
    """``repaired`` image names; ``unrepairable`` lists ``(name, reason)``."""

    repaired: list[str] = field(default_factory=list)
    unrepairable: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.unrepairable

    def summary(self) -> str:
        lines = [f"repair: {len(self.repaired)} images repaired, {len(self.unrepairable)} not repairable"]
        lines += [f"  repaired {name}" for name in self.repaired]
        lines += [f"  not repairable {name}: {why}" for name, why in self.unrepairable]
        return "\n".join(lines)


def repair(path: str, report: VerifyReport) -> RepairReport:
    """Re-ingest the images in ``report.damaged`` (from :func:`~ssl_med.data.verify.verify`) from their
    recorded sources; run ``verify`` again afterwards to see what the store holds now. Holds the store's
    writer lock (:mod:`ssl_med.data.writer_lock`): an ingest into the same store waits for it, and it for that."""
    with exclusive_writer(path):
        return _repair(ImageStore(path, mode="a"), report)


def _repair(store: ImageStore, report: VerifyReport) -> RepairReport:
    result = RepairReport()
    groups: dict[tuple[str, str], list[str]] = {}
    for name in sorted(report.damaged):
        meta = store.manifest.get(name)
        if meta is None:
            continue
        if not meta.source or not meta.content_hash:
            result.unrepairable.append(
                (name, "no source and content hash recorded (ingested before digests)")
            )
            continue
        groups.setdefault((meta.source, meta.content_hash), []).append(name)
    for (where, digest), names in groups.items():
        if not os.path.exists(where):
            result.unrepairable += [(n, f"source {where} is gone") for n in names]
            continue
        source = _find_source(where, digest)
        if source is None:
            result.unrepairable += [(n, f"source {where} changed (its content no longer hashes to {digest})")
                                    for n in names]  # fmt: skip
            continue
        for name, why in _rewrite(store, source, names, digest):
            (result.unrepairable.append((name, why)) if why else result.repaired.append(name))
    return result


def _find_source(where: str, digest: str) -> Source | None:
    """The source at ``where`` whose files hash to ``digest``; a file that was one slice of a DICOM
    series is looked for among the series of its folder. DICOM series are looked for stacked as today's
    ingest stacks them, then (only if none matches) one image each, as ``--no-series-channels`` and
    stores written before stacking have them."""
    for series_channels in (True, False):
        candidates, _ = discover([where], series_channels=series_channels)
        if os.path.isfile(where):
            more, _ = discover([os.path.dirname(where) or "."], series_channels=series_channels)
            candidates += [s for s in more if where in s.paths and len(s.paths) > 1]
        for source in candidates:
            try:
                if source_digest(source.paths) == digest:
                    return source
            except OSError:
                continue
    return None


def _rewrite(store: ImageStore, source: Source, names: list[str], digest: str) -> list[tuple[str, str]]:
    """Re-read ``source`` and write the images ``names`` again; ``(name, "")`` when repaired, else the reason."""
    metas = {n: store.manifest[n] for n in names}
    outcome: list[tuple[str, str]] = []
    singles = [n for n, m in metas.items() if m.index is None]
    rows = [n for n, m in metas.items() if m.index is not None]
    for name in singles:
        outcome += _write(store, replace(source, name=name), {name}, metas, digest)
    if rows:
        outcome += _write(store, source, set(rows), metas, digest)
    return outcome


def _write(
    store: ImageStore, source: Source, wanted: set[str], metas: dict[str, ImageMeta], digest: str
) -> list[tuple[str, str]]:
    first = min(wanted)
    options = _options(store, first, metas[first])
    written: dict[str, ImageMeta] = {}
    try:
        for record in read_source(source):
            if isinstance(record, StackRecord):
                if not wanted & set(record.names):
                    continue
                if (
                    metas[first].array
                    and store.array_path(min(wanted & set(record.names))) != f"stacks/{record.name}"
                ):
                    return [
                        (n, "its stack was stored under another name; re-ingest the source") for n in wanted
                    ]
                written.update(_write_stack(store, record, options, digest))
            elif record.name in wanted:
                written[record.name] = _write_record(store, record, options, digest)
    except Exception as exc:  # the source is readable no more (permissions, a library change ...)
        return [(n, f"re-reading {source.describe()} failed ({type(exc).__name__}: {exc})") for n in wanted]
    changed = [n for n in wanted if n in written and tuple(written[n].shape) != tuple(metas[n].shape)]
    store.record({n: m for n, m in written.items() if n in store.manifest})
    return [
        (n, "" if n in written and n not in changed else
            f"re-reading {source.describe()} gave shape {written[n].shape}, the manifest says {metas[n].shape}"
            if n in written else f"{source.describe()} no longer yields it")
        for n in sorted(wanted)
    ]  # fmt: skip


def _options(store: ImageStore, name: str, meta: ImageMeta) -> IngestOptions:
    """The ingest options ``meta`` records, with the chunking of its current array (if still there)."""
    steps = meta.preprocessing
    return IngestOptions(
        spacing=tuple(steps["resampled_to"]) if steps.get("resampled_to") else None,
        orientation=steps.get("reoriented_to", ""),
        hu_clip=tuple(steps["hu_clip"]) if steps.get("hu_clip") else None,
        modality=meta.modality,
        split=meta.split,
        layout=_layout(store, name, meta),
        pyramid=_has_pyramid(store, name, meta),
    )


def _has_pyramid(store: ImageStore, name: str, meta: ImageMeta) -> bool | None:
    """Whether the image's group lists downsampled levels (``None``: unknown, decide by size)."""
    if meta.index is not None or meta.array:
        return None
    try:
        attrs = dict(store.root[f"{IMAGES_GROUP}/{name}"].attrs)
    except KeyError:
        return None
    return bool(ome.level_factors(attrs, meta.spacing)) if "ome" in attrs else None


def _layout(store: ImageStore, name: str, meta: ImageMeta) -> Layout:
    try:
        arr = store.root[store.array_path(name)]
    except KeyError:
        return DEFAULT_LAYOUT
    chunks, shards = tuple(arr.chunks), getattr(arr, "shards", None)
    if meta.index is not None:  # a stack: whole images, so many per chunk
        per_chunk = math.prod(chunks) * arr.dtype.itemsize
        return replace(DEFAULT_LAYOUT, stack_chunk_bytes=per_chunk)
    edge = max(chunks[1:])
    return replace(DEFAULT_LAYOUT, chunk_3d=edge, chunk_2d=edge, shard_3d=max(shards[1:]) if shards else None)
