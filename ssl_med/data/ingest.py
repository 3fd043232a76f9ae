"""``ssl_med ingest``: convert NIfTI / DICOM / PNG / JPEG / TIFF / MedMNIST / NumPy inputs into an image store.

Work is split into sources (:func:`~ssl_med.data.readers.discover.discover`) and run in parallel
worker processes (``spawn``: zarr's I/O threads make ``fork`` unsafe). Each worker reads, checks,
preprocesses and writes its images' arrays; the parent alone writes the manifest, in batches, so an
interrupted ingest leaves at worst arrays that are not yet listed: re-running rewrites the unlisted
ones. Every image records the digest of the files it was read from (:mod:`ssl_med.data.identity`), so
an input the store already holds is skipped whatever root it is found under (``ingest siteA`` then
``ingest siteA siteB``), as is a second copy of one file within a run; it is counted as "already in
the store". A new input whose name is taken gets a fresh one. A source that fails (corrupt,
unreadable, NaN-only, zero-size, inconsistent series) is reported with its reason and never stops the
others. ``channel_names`` (``--channel-names``) name the channels of images whose files name none,
checked against every input's header before anything is written (:mod:`ssl_med.data.ingest_channels`).
The DICOM volume series of one study in one folder that share a voxel grid become one image with a
channel per series, named by ``SeriesDescription`` (:mod:`ssl_med.data.readers.dicom_case`).
"""

from __future__ import annotations

import concurrent.futures as cf
import multiprocessing
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

import numpy as np

from ssl_med.data.channels import is_placeholder
from ssl_med.data.identity import free_name, known_digests, legacy_names, source_digest
from ssl_med.data.ingest_channels import check_channel_names, name_channels, parse_channel_names
from ssl_med.data.layout import DEFAULT_LAYOUT, Layout
from ssl_med.data.readers import ReadError, Record, Source, StackRecord, read_source
from ssl_med.data.readers.discover import discover
from ssl_med.data.readers.medmnist import SPLITS, row_name
from ssl_med.data.store import IMAGES_GROUP, ImageMeta, ImageStore
from ssl_med.data.writer_lock import exclusive_writer
from ssl_med.lifetimes import Interrupted, StopSignals, abandonable, init_worker, stop_workers

INGEST_VERSION = 1
FLUSH_EVERY_IMAGES = 256
FLUSH_EVERY_SECONDS = 20.0


@dataclass(frozen=True)
class IngestOptions:
    """What ingest does to every image.

    Attributes:
        spacing: target voxel spacing ``(z, y, x)`` in mm for volumes (resampled with MONAI), or ``None``.
        orientation: axis codes volumes are reoriented to (``"RAS"``); ``""`` keeps the source's.
        hu_clip: ``(low, high)`` HU window CT images are clipped to, or ``None`` (raw values).
        modality: modality for images whose source does not say (NIfTI, rasters, NumPy).
        split: split recorded for images whose source has none (MedMNIST keeps its own).
        layout: chunks, shards and codec of the arrays.
        pyramid: downsampled levels for viewers beside each image: ``True``, ``False``, or ``None``
            for images with a spatial axis over 256 (:mod:`ssl_med.data.pyramid`); level 0 is the data.
    """

    spacing: tuple[float, float, float] | None = None
    orientation: str = "RAS"
    hu_clip: tuple[float, float] | None = None
    modality: str = ""
    split: str = ""
    layout: Layout = DEFAULT_LAYOUT
    pyramid: bool | None = None


@dataclass
class SourceResult:
    """What happened to one source: images written (``{name: meta dict}``), already present, or skipped;
    ``digest`` identifies the content of its files."""

    source: Source
    written: dict[str, dict[str, Any]] = field(default_factory=dict)
    present: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    digest: str = ""


@dataclass
class IngestReport:
    """Summary of an ingest run: ``skipped`` lists ``(input, reason)``; ``notes`` lists ``(folder,
    text)`` for folders whose DICOM series were ingested as separate images rather than as the channels
    of one (:func:`~ssl_med.data.readers.dicom_case.plan_folder`): nothing of them was skipped."""

    written: int = 0
    present: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[tuple[str, str]] = field(default_factory=list)

    def summary(self) -> str:
        lines = [f"{self.written} images written, {self.present} already in the store, "
                 f"{len(self.skipped)} skipped ({self.seconds:.1f} s)"]  # fmt: skip
        lines += [f"  skipped {what}: {why}" for what, why in self.skipped]
        lines += [f"  note {what}: {why}" for what, why in self.notes]
        return "\n".join(lines)


_STORES: dict[str, ImageStore] = {}


def _store(path: str) -> ImageStore:
    """One append handle per process and store (workers reuse it across sources)."""
    if path not in _STORES:
        _STORES[path] = ImageStore(path, mode="a")
    return _STORES[path]


def _prepare(
    record: Record, options: IngestOptions
) -> tuple[np.ndarray, dict[str, np.ndarray], dict[str, Any]]:
    """Storage-order array ``(C, *spatial)``, label maps ``(1, *spatial)`` and write keyword arguments."""
    from ssl_med.data import preprocess

    modality = record.modality or options.modality
    steps: dict[str, Any] = {"ingest_version": INGEST_VERSION}
    kwargs: dict[str, Any] = {"unit": record.unit}
    array, labels = record.array, record.labels
    if record.affine is not None:
        affine = original = np.asarray(record.affine, dtype=np.float64)
        if options.orientation:
            array, affine, labels = preprocess.reorient(array, affine, labels, options.orientation)
            steps["reoriented_to"] = options.orientation
        if options.spacing is not None:
            array, affine, labels = preprocess.resample(array, affine, labels, options.spacing[::-1])
            steps["resampled_to"] = list(options.spacing)
        array, labels, geometry = preprocess.to_storage(array, affine, labels)
        spacing: tuple[float, ...] = geometry.spacing
        kwargs.update(origin=geometry.origin, orientation=geometry.orientation, affine=geometry.affine,
                      original_affine=original)  # fmt: skip
    else:
        spacing = record.spacing
        labels = {k: v[None] for k, v in labels.items()}
    if modality.upper() == "CT" and options.hu_clip is not None:
        array = preprocess.clip_hu(array, options.hu_clip)
        steps["hu_clip"] = list(options.hu_clip)
    if modality.upper() == "CT":
        steps["normalisation"] = {"type": "window", "window": list(options.hu_clip or (-1024.0, 3071.0))}
    else:
        steps["normalisation"] = {"type": "percentile", "low": "p0.5", "high": "p99.5"}
    kwargs.update(spacing=spacing, modality=modality, preprocessing=steps)
    return array, labels, kwargs


def _write_record(store: ImageStore, record: Record, options: IngestOptions, digest: str) -> ImageMeta:
    array, labels, kwargs = _prepare(record, options)
    spacing = kwargs.pop("spacing")
    return store.write_image(
        record.name, array, spacing, channel_names=_channel_names(store, record, digest), source=record.source,
        split=record.split or options.split, label=record.label, labels=labels, layout=options.layout,
        extra=record.extra, content_hash=digest, pyramid=options.pyramid, **kwargs,
    )  # fmt: skip


def _channel_names(store: ImageStore, record: Record, digest: str) -> tuple[str, ...]:
    """The record's channel names; but an image the store lists under this name from the same content
    (``--repair`` rewrites it) keeps the names listed for it when its files name none: names given at
    ingest (``--channel-names``) are not in the files."""
    listed = store.manifest.get(record.name)
    if listed is None or listed.content_hash != digest or not is_placeholder(record.channel_names):
        return record.channel_names
    if len(listed.channel_names) == record.array.shape[0] and not is_placeholder(listed.channel_names):
        return listed.channel_names
    return record.channel_names


def _write_stack(store: ImageStore, record: StackRecord, options: IngestOptions, digest: str) -> dict[str, ImageMeta]:
    return store.write_stack(
        record.name, record.images, record.spacing, names=record.names, labels=record.labels or None,
        split=record.split, modality=record.modality or options.modality, channel_names=record.channel_names,
        source=record.source, layout=options.layout, extra=record.extra, content_hash=digest,
    )  # fmt: skip


def ingest_source(
    store_path: str,
    source: Source,
    options: IngestOptions,
    existing: frozenset[str],
    known: Mapping[str, int] | None = None,
    channel_names: tuple[str, ...] = (),
) -> SourceResult:
    """Read, check, preprocess and write one source (runs in a worker); never raises, except
    ``SystemExit`` in a worker told to abandon it (:func:`~ssl_med.lifetimes.stop_workers`).

    Args:
        existing: names listed without a content digest (older stores): records of these are present.
        known: ``{digest: number of images}`` the store holds; a source with a known digest is present
            without being read.
        channel_names: names for the channels of records whose reader names none
            (:func:`~ssl_med.data.ingest_channels.name_channels`).
    """
    with abandonable():  # the parent may ask a running worker to give this source up (SIGINT / SIGTERM)
        return _ingest_source(store_path, source, options, existing, known, channel_names)


def _ingest_source(
    store_path: str,
    source: Source,
    options: IngestOptions,
    existing: frozenset[str],
    known: Mapping[str, int] | None,
    channel_names: tuple[str, ...],
) -> SourceResult:
    result = SourceResult(source)
    store = _store(store_path)
    try:
        result.digest = digest = source_digest(source.paths)
        if known and digest in known:
            result.present = known[digest]
            return result
        for record in read_source(source):
            if channel_names:
                record = name_channels(record, channel_names)
            names = record.names if isinstance(record, StackRecord) else [record.name]
            if set(names) <= existing:
                result.present += len(names)
                continue
            try:
                if isinstance(record, StackRecord):
                    metas = _write_stack(store, record, options, digest)
                else:
                    metas = {record.name: _write_record(store, record, options, digest)}
            except (ReadError, ValueError) as exc:
                result.skipped.append((f"{source.describe()} [{record.name}]", str(exc)))
                continue
            result.written.update({n: m.to_dict() for n, m in metas.items()})
    except ReadError as exc:
        result.skipped.append((source.describe(), str(exc)))
    except Exception as exc:  # a bad file must never stop the ingest: report what the library said
        result.skipped.append((source.describe(), f"unreadable ({type(exc).__name__}: {exc})"))
    return result


# long because collect/flush/failed are closures over this run's report, store and pending listing
def ingest(
    inputs: Sequence[str],
    out: str,
    options: IngestOptions = IngestOptions(),
    workers: int = 1,
    progress: bool = True,
    log: Callable[[str], None] = print,
    channel_names: str | Sequence[str] = (),
    series_channels: bool = True,
) -> IngestReport:
    """Ingest ``inputs`` (files/folders) into the store at ``out`` (created if missing); resumable.

    Args:
        workers: worker processes (``<= 1``: in this process).
        progress: show a tqdm progress bar over sources.
        log: where per-source skip messages go as they happen.
        channel_names: ``--channel-names``: names (or ``"T1,T1ce,..."``) for the channels of images
            whose files name none; names read from files win (:mod:`ssl_med.data.ingest_channels`).
            Not an :class:`IngestOptions` field: they name images, they do not change their data.
        series_channels: ``--series-channels`` (default): the DICOM volume series of one study that
            share a folder and a voxel grid become one image, one channel per series named by its
            ``SeriesDescription`` (:mod:`ssl_med.data.readers.dicom_case`); series that cannot be
            stacked stay separate images, with a note saying why (``report.notes``, ``log``).
            ``False``: every series is its own image.

    Raises:
        ChannelNamesError: ``channel_names`` are malformed or do not fit the unnamed channels of some
            inputs (checked from their headers before the store is opened: nothing is written).
    """
    start = time.perf_counter()
    report = IngestReport()
    sources, problems = discover(list(inputs), series_channels=series_channels, notes=report.notes)
    for what, why in report.notes:
        log(f"note {what}: {why}")
    given_names = parse_channel_names(channel_names) if channel_names else ()
    if given_names:
        check_channel_names(sources, given_names)
    report.skipped += problems
    with exclusive_writer(out):  # a second ingest into this store waits, saying for whom
        store = ImageStore(out, mode="a")
        hashes = {name: meta.content_hash for name, meta in store.manifest.items()}
        existing, known = legacy_names(hashes), known_digests(hashes.values())
        todo, report.present = plan_sources(sources, store.manifest)
        pending: dict[str, ImageMeta] = {}
        last_flush = time.perf_counter()

        def collect(result: SourceResult) -> None:
            nonlocal last_flush
            report.present += result.present
            report.skipped += result.skipped
            for what, why in result.skipped:
                log(f"skipped {what}: {why}")
            if result.written and result.digest in known:  # a copy of a file another worker wrote in this run
                _discard(store, result.written)
                report.present += len(result.written)
                return
            if result.written:
                known[result.digest] = len(result.written)
            pending.update({n: ImageMeta.from_dict(d) for n, d in result.written.items()})
            if pending and (
                len(pending) >= FLUSH_EVERY_IMAGES or time.perf_counter() - last_flush > FLUSH_EVERY_SECONDS
            ):
                flush()

        def flush() -> None:
            nonlocal last_flush
            report.written += len(pending)
            store.record(dict(sorted(pending.items())))
            pending.clear()
            last_flush = time.perf_counter()

        # picklable for the pool; in this process it sees ``known`` grow, so a second copy is not even read
        work = partial(ingest_source, store.path, options=options, existing=existing, known=known, channel_names=given_names)
        def failed(source: Source, exc: BaseException) -> None:  # a worker died (e.g. out of memory)
            report.skipped.append((source.describe(), f"worker failed ({exc!r})"))

        bar = _progress(len(todo), progress)
        stop = StopSignals("ingest")
        try:
            with stop:
                if workers <= 1 or len(todo) <= 1:
                    for source in todo:
                        if stop.received is not None:
                            break
                        result = None
                        with stop.abandoning():  # a signal ends the source being read; its arrays are not listed
                            result = work(source)
                        if result is not None:  # finished before any signal
                            collect(result)
                            bar.update(1)
                else:
                    _run_in_pool(work, todo, workers, stop, collect, failed, bar.update)
        finally:
            bar.close()
            if pending:
                flush()
        store.record({}, sort=True)
        report.seconds = time.perf_counter() - start
        if stop.received is not None:
            raise Interrupted(
                stop.received, f"stopped by {stop.signal_name}: {report.written} images written and listed, "
                f"{report.present} already in the store; run the same command again to continue",
            )  # fmt: skip
        return report


def _run_in_pool(
    work: Callable[[Source], SourceResult],
    todo: Sequence[Source],
    workers: int,
    stop: StopSignals,
    collect: Callable[[SourceResult], None],
    failed: Callable[[Source, BaseException], None],
    advance: Callable[[int], Any],
) -> None:
    """``work`` on every source in ``workers`` spawned processes, results to ``collect`` as they come.

    The workers die with this process and ignore SIGINT / SIGTERM (:func:`~ssl_med.lifetimes.init_worker`).
    When ``stop`` records a signal, or anything goes wrong here, the sources not started are cancelled
    and the running workers abandon theirs (:func:`~ssl_med.lifetimes.stop_workers`): what they wrote
    is not listed, and a re-run rewrites it.
    """
    before = set(multiprocessing.active_children())
    ctx = multiprocessing.get_context("spawn")
    pool = cf.ProcessPoolExecutor(max_workers=workers, mp_context=ctx, initializer=init_worker, initargs=(os.getpid(),))
    finished = False
    try:
        futures = {pool.submit(work, s): s for s in todo}
        waiting = set(futures)
        while waiting and stop.received is None:
            done, waiting = cf.wait(waiting, timeout=0.5, return_when=cf.FIRST_COMPLETED)
            for future in done:
                try:
                    collect(future.result())
                except Exception as exc:
                    failed(futures[future], exc)
                advance(1)
        finished = not waiting
    finally:
        if not finished:
            pool.shutdown(wait=False, cancel_futures=True)
            stop_workers(set(multiprocessing.active_children()) - before)
        pool.shutdown(wait=True)


def plan_sources(sources: Sequence[Source], manifest: Mapping[str, ImageMeta]) -> tuple[list[Source], int]:
    """The sources to hand to workers, and how many are present by name in a store without digests.

    A source whose name the store lists with a content digest is renamed clear of it (``x`` -> ``x_2``):
    the worker then finds it present by its digest, or writes it as a new image without replacing the
    listed one. A name listed without a digest (a store from before digests) means present, as before.
    """

    def listed(name: str, kind: str) -> list[ImageMeta]:
        keys = [row_name(name, split, 0) for split in SPLITS] if kind == "medmnist" else [name]
        return [manifest[k] for k in keys if k in manifest]

    used = {s.name for s in sources}
    todo: list[Source] = []
    present = 0
    for source in sources:
        metas = listed(source.name, source.kind)
        if metas and not any(m.content_hash for m in metas):
            if source.kind != "medmnist":  # MedMNIST splits are matched by row name in the worker
                present += 1
                continue
        elif metas:
            name = free_name(source.name, lambda n, kind=source.kind: n in used or bool(listed(n, kind)))
            used.add(name)
            source = replace(source, name=name)
        todo.append(source)
    return todo, present


def _discard(store: ImageStore, written: Mapping[str, Mapping[str, Any]]) -> None:
    """Delete the arrays of images that were written but will not be listed (duplicates)."""
    paths = {meta.get("array") or f"{IMAGES_GROUP}/{name}" for name, meta in written.items()}
    for path in sorted(paths):
        if path in store.root:
            del store.root[path]


def _progress(total: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=total, unit="src", desc="ingest", disable=not enabled or total == 0)
