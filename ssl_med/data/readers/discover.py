"""Find the ingest :class:`~ssl_med.data.readers.Source` objects under input files and folders."""

from __future__ import annotations

import os
import re
from collections import defaultdict
from pathlib import Path

from ssl_med.data.readers.base import Source
from ssl_med.data.readers.dicom import is_dicom
from ssl_med.data.readers.dicom_case import KIND as DICOM_CASE
from ssl_med.data.readers.dicom_case import plan_folder
from ssl_med.data.readers.nifti import case_suffixes, nifti_stem
from ssl_med.data.readers.raster import PIL_SUFFIXES, TIFF_SUFFIXES

NIFTI = re.compile(r".*\.nii(\.gz)?$", re.IGNORECASE)


def _kind(path: Path) -> str | None:
    """The reader kind of a single file (``None``: not an input we know; DICOM is grouped later)."""
    name, suffix = path.name.lower(), path.suffix.lower()
    if NIFTI.match(name):
        return "nifti"
    if suffix in PIL_SUFFIXES + TIFF_SUFFIXES:
        return "raster"
    if suffix == ".npz":
        return "medmnist"
    if suffix == ".npy":
        return "numpy"
    if is_dicom(path):
        return "dicom"
    return None


def _stem(path: Path) -> str:
    return nifti_stem(path) if NIFTI.match(path.name) else path.stem


def _clean(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "image"


def _folder_sources(
    folder: Path, files: list[Path], series_channels: bool = True, notes: list[tuple[str, str]] | None = None
) -> list[Source]:
    """Sources among the files directly inside ``folder``; DICOM series of one study and grid become
    one multi-channel source when ``series_channels`` (:mod:`~ssl_med.data.readers.dicom_case`), and
    ``notes`` gets ``(folder, text)`` saying which series were kept apart and why."""
    out: list[Source] = []
    by_kind: dict[str, list[Path]] = defaultdict(list)
    for f in sorted(files):
        kind = _kind(f)
        if kind is not None:
            by_kind[kind].append(f)
    niftis = by_kind.pop("nifti", [])
    if niftis and case_suffixes([str(f) for f in niftis]) is not None:
        out.append(Source("case", tuple(str(f) for f in niftis), _clean(folder.name)))
    else:
        out += [Source("nifti", (str(f),), _clean(_stem(f))) for f in niftis]
    dicoms = by_kind.pop("dicom", [])
    if dicoms:
        plan = plan_folder([str(f) for f in dicoms], stack=series_channels)
        for paths, channels in plan.stacks:
            name = folder.name if len(plan.stacks) == 1 else f"{folder.name}_{'_'.join(channels)}"
            out.append(Source(DICOM_CASE, paths, _clean(name)))
        for i, paths in plan.separate:
            name = (
                _stem(Path(paths[0])) if len(paths) == 1 else folder.name + (f"_s{i}" if plan.n_series > 1 else "")
            )
            out.append(Source("dicom", paths, _clean(name)))
        if plan.note and notes is not None:
            notes.append((str(folder), plan.note))
    for kind, paths in by_kind.items():
        out += [Source(kind, (str(f),), _clean(_stem(f))) for f in paths]
    return out


def discover(
    inputs: list[str], series_channels: bool = True, notes: list[tuple[str, str]] | None = None
) -> tuple[list[Source], list[tuple[str, str]]]:
    """Sources under ``inputs`` (files or folders, walked recursively), with unique names.

    Args:
        series_channels: stack the DICOM volume series of one study and grid in a folder as the
            channels of one image (``--series-channels``); off: every series is its own image.
        notes: if given, gets ``(folder, text)`` for folders whose DICOM series were not all stacked,
            with the reasons (the series are ingested as separate images).

    Returns ``(sources, problems)`` where ``problems`` lists ``(input, reason)`` for inputs that do
    not exist or hold nothing ingestible.
    """
    sources: list[Source] = []
    problems: list[tuple[str, str]] = []
    for item in inputs:
        p = Path(item)
        if p.is_file():
            kind = _kind(p)
            if kind is None:
                problems.append((item, f"unknown file type {p.suffix or '(no suffix)'}"))
            else:
                sources.append(Source(kind, (str(p),), _clean(_stem(p))))
        elif p.is_dir():
            found = []
            for folder, _dirs, files in sorted((Path(d), ds, fs) for d, ds, fs in os.walk(p)):
                found += _folder_sources(folder, [folder / f for f in files], series_channels, notes)
            if not found:
                problems.append((item, "no images found in folder"))
            sources += found
        else:
            problems.append((item, "no such file or folder"))
    return _unique(sources), problems


def _unique(sources: list[Source]) -> list[Source]:
    """Rename duplicates deterministically by prefixing parent folder names (then a counter)."""
    seen: dict[str, int] = defaultdict(int)
    for s in sources:
        seen[s.name] += 1
    out, used = [], set()
    for s in sources:
        name = s.name
        if seen[name] > 1:
            parent = Path(s.paths[0]).parent
            name = (
                _clean(f"{parent.name}_{name}")
                if s.kind not in ("case", DICOM_CASE)
                else _clean(f"{parent.parent.name}_{name}")
            )
        base, k = name, 1
        while name in used:
            k += 1
            name = f"{base}_{k}"
        used.add(name)
        out.append(Source(s.kind, s.paths, name))
    return out
