"""Pretraining straight from a folder (``data=folder data.path=/images``): ingest once into a cached store.

The inputs are anything ``ssl_med ingest`` accepts (a folder searched recursively, or a file: NIfTI,
DICOM series, PNG/JPEG/TIFF, MedMNIST ``.npz``, NumPy). The first run ingests them, with
ingest's progress bar and its report of skipped inputs, into
``<cache>/folders/<fingerprint>.zarr`` (``$SSL_MED_CACHE`` or ``~/.cache/ssl_med``); later runs,
including the other points of a sweep and the other processes of a multi-GPU run, find it and train
from it without reading the inputs again.

The fingerprint is a SHA-256 over the input's absolute path, every file's relative path, size and
modification time, and the ingest options: a file added, removed or rewritten gives a new store, as
does another ``data.ingest`` setting. Inside the store each image carries the content digest of the
files it was read from, as with ``ssl_med ingest``. Stores of earlier versions of a folder stay in the
cache until deleted.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from ssl_med.data.ingest import INGEST_VERSION, IngestOptions, ingest
from ssl_med.data.sources.demo import cache_dir
from ssl_med.registry import SOURCES

log = logging.getLogger(__name__)

#: ``data.ingest`` keys besides the :class:`~ssl_med.data.ingest.IngestOptions` fields
RUN_OPTIONS = ("workers",)


def fingerprint(path: str | Path, options: IngestOptions) -> tuple[str, int]:
    """``(hex digest, number of files)`` of ``path`` as it is now (see the module docstring)."""
    root = Path(path).resolve()
    digest = hashlib.sha256()
    digest.update(json.dumps({"path": str(root), "ingest_version": INGEST_VERSION,
                              "options": asdict(options)}, sort_keys=True, default=str).encode())  # fmt: skip
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
    for file in files:
        stat = file.stat()
        rel = file.relative_to(root).as_posix() if file != root else file.name
        digest.update(f"\n{rel}\t{stat.st_size}\t{stat.st_mtime_ns}".encode())
    return digest.hexdigest(), len(files)


def ingest_options(options: Mapping[str, Any]) -> tuple[IngestOptions, int]:
    """``data.ingest`` as :class:`~ssl_med.data.ingest.IngestOptions` and the worker count."""
    valid = {f.name for f in fields(IngestOptions)} - {"layout"}
    unknown = sorted(set(options) - valid - set(RUN_OPTIONS))
    if unknown:
        raise ValueError(f"unknown data.ingest option(s) {unknown}; valid: {', '.join(sorted(valid | set(RUN_OPTIONS)))}")
    kwargs = {k: (tuple(v) if isinstance(v, list | tuple) else v) for k, v in options.items() if k in valid and v is not None}
    return IngestOptions(**kwargs), int(options.get("workers") or 1)


@contextlib.contextmanager
def _exclusive(lock_file: Path) -> Iterator[None]:
    """Holds an exclusive lock on ``lock_file`` (POSIX ``flock``; elsewhere no lock, and concurrent
    first runs each ingest and the first rename wins)."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(lock_file, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def folder_store(path: str | Path, options: IngestOptions | None = None, workers: int = 1, progress: bool = True) -> str:
    """The cached store of ``path`` (built on first use, see the module docstring); its path."""
    options = options or IngestOptions()
    if not Path(path).exists():
        raise FileNotFoundError(f"data.path={path}: no such file or folder")
    key, n_files = fingerprint(path, options)
    folder = cache_dir() / "folders"
    store = folder / f"{key[:24]}.zarr"
    with _exclusive(folder / f"{key[:24]}.lock"):
        if store.exists():
            log.info("data.path=%s: %d files unchanged, training from the cached store %s", path, n_files, store)
            return str(store)
        log.info("data.path=%s: ingesting %d files into %s (once; reused while the folder is unchanged)", path, n_files, store)
        tmp = store.with_suffix(f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            report = ingest([str(path)], str(tmp), options, workers=workers, progress=progress, log=lambda _: None)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        (log.warning if report.skipped else log.info)("ingest of %s:\n%s", path, report.summary())
        if report.written == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise ValueError(f"data.path={path}: no image could be ingested\n{report.summary()}")
        store.with_suffix(".json").write_text(json.dumps(  # what the store holds, for whoever clears the cache
            {"path": str(Path(path).resolve()), "files": n_files, "options": asdict(options)}, indent=1, default=str,
        ))  # fmt: skip
        tmp.rename(store)  # atomic: a half-built store is never seen
    return str(store)


@SOURCES.register("folder")
def folder_source(path: str, spatial_dims: int = 2, ingest: Mapping[str, Any] | None = None) -> str:
    """``data=folder data.path=PATH``: the cached store of ``PATH`` (:func:`folder_store`), with
    ``data.ingest`` options (``spacing``, ``orientation``, ``hu_clip``, ``modality``, ``split``, ``workers``)."""
    options, workers = ingest_options(ingest or {})
    return folder_store(path, options, workers)
