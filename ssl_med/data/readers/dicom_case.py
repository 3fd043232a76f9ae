"""Several DICOM volume series of one study in one folder, stacked as the channels of one image.

Multi-sequence MRI exported as DICOM is one study folder holding a series per sequence (T1, T1ce, T2,
FLAIR; or T2, DWI, ADC), each with its ``SeriesInstanceUID`` and ``SeriesDescription``. As a NIfTI case
folder (:func:`~ssl_med.data.readers.nifti.read_case`) becomes one image ``(C, I, J, K)`` with one
channel per sequence, so do the series of a folder that

* belong to one study (same ``StudyInstanceUID``),
* are volumes: two or more single-frame slices with positions, or one enhanced multi-frame file whose
  frames carry their plane positions (:func:`~ssl_med.data.readers.dicom.frame_geometry`),
* lie on one voxel grid (same shape ``(I, J, K)``, affines equal within 1e-3), and
* have distinct, non-empty sequence names (:func:`sequence_name` of their ``SeriesDescription``).

Channels are ordered as NIfTI sequences are (:data:`~ssl_med.data.readers.nifti.SEQUENCE_ORDER`, then
by name). Nothing is resampled: series that do not qualify stay separate images, exactly as with
stacking off, and :func:`plan_folder` says why for each of them (an ingest note). The
decision is made from the headers during discovery; the pixels are read in a worker by
:func:`read_dicom_case`, where a series whose files turn out corrupt is reported and left out while
the other series still make the image.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ssl_med.data.channels import is_placeholder
from ssl_med.data.readers.base import ReadError, Record, Source
from ssl_med.data.readers.dicom import read_datasets, series_geometry, series_volume
from ssl_med.data.readers.nifti import AFFINE_TOLERANCE, MR_SEQUENCES, canonical_sequence, ordered_sequences

KIND = "dicom_case"


def sequence_name(description: str) -> str:
    """The channel name of a series: ``t1ce`` / ``t1`` for the clinical spellings of post- / pre-contrast
    T1 (:func:`~ssl_med.data.readers.nifti.canonical_sequence`: ``"T1 post contrast"``, ``"T1+C"``,
    ``"T1-Gd"``, ``"MPRAGE post"`` -> ``t1ce``; ``"T1 pre"`` -> ``t1``), else its ``SeriesDescription``
    lower-cased, ``*`` spelt ``star`` and runs of other characters made ``_``; written without the ``_``
    when that is one of the NIfTI sequence names (:data:`~ssl_med.data.readers.nifti.SEQUENCE_ORDER`):
    ``"T1"`` -> ``t1``, ``"T2*"`` -> ``t2star``, ``"FLAIR"`` -> ``flair``, ``"Ax T2 FLAIR"`` ->
    ``ax_t2_flair``. ``""`` when there is no description."""
    canonical = canonical_sequence(description)
    if canonical is not None:
        return canonical
    text = description.strip().lower().replace("*", "star")
    cleaned = re.sub(r"[^a-z0-9]+", "_", text).strip("_")
    compact = cleaned.replace("_", "")
    return compact if compact in MR_SEQUENCES else cleaned


@dataclass
class _Series:
    """The header facts of one series that decide whether it can be a channel."""

    key: str
    paths: list[str]
    study: str = ""
    description: str = ""
    frames: int = 1
    grid: tuple[tuple[int, int, int], np.ndarray] | None = None
    problem: str = ""  # why it is not a volume with a grid ("" when it is)

    @property
    def label(self) -> str:
        return f"series {self.description!r}" if self.description else f"series of {Path(self.paths[0]).name}"


def _scan(files: Sequence[str]) -> dict[str, _Series]:
    """``{series key: series}`` of ``files`` from their headers; a file whose header is unreadable (or
    that has no ``SeriesInstanceUID``) is a series of its own, reported when it is read."""
    import pydicom

    series: dict[str, _Series] = {}
    headers: dict[str, list] = defaultdict(list)
    for path in files:
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            key = str(getattr(ds, "SeriesInstanceUID", "")) or f"file:{path}"
        except Exception:
            ds, key = None, f"file:{path}"
        if key not in series:
            series[key] = _Series(key, [])
            if ds is not None:
                series[key].study = str(getattr(ds, "StudyInstanceUID", ""))
                series[key].description = str(getattr(ds, "SeriesDescription", "") or "").strip()
        series[key].paths.append(path)
        if ds is not None:
            headers[key].append(ds)
            series[key].frames = max(series[key].frames, int(getattr(ds, "NumberOfFrames", 1) or 1))
    for key, s in series.items():
        if not headers[key]:
            s.problem = "a file whose header cannot be read"
        elif s.frames > 1 and len(s.paths) > 1:
            s.problem = f"{len(s.paths)} multi-frame files in one series (one multi-frame file per volume is read)"
        elif len(s.paths) == 1 and s.frames == 1:
            s.problem = "a single image, not a volume"
        else:
            try:
                _, shape, affine = series_geometry(headers[key])
                s.grid = (shape, affine)
            except Exception as exc:  # reported again, with the same reason, when the series is read
                s.problem = str(exc) if isinstance(exc, ReadError) else f"unreadable geometry ({exc})"
    return series


def _same_grid(a: tuple, b: tuple) -> bool:
    return a[0] == b[0] and bool(np.allclose(a[1], b[1], atol=AFFINE_TOLERANCE))


def _groups(series: list[_Series]) -> tuple[list[list[_Series]], dict[str, str]]:
    """The groups of series to stack, and ``{series key: why not stacked}`` for the rest."""
    clusters: list[list[_Series]] = []
    for s in series:
        if s.grid is None:
            continue
        home = next((c for c in clusters if c[0].study == s.study and _same_grid(c[0].grid, s.grid)), None)
        if home is None:
            clusters.append([s])
        else:
            home.append(s)
    why: dict[str, str] = {s.key: s.problem for s in series if s.grid is None}
    stacked = []
    for cluster in clusters:
        if len(cluster) == 1:
            s = cluster[0]
            twin = next((o for o in series if o is not s and o.grid is not None and _same_grid(o.grid, s.grid)), None)
            shape = "x".join(map(str, s.grid[0]))
            why[s.key] = (
                f"same grid as {twin.label} but another study (StudyInstanceUID)" if twin is not None
                else f"its grid ({shape} voxels and affine) matches no other series of its study"
            )  # fmt: skip
            continue
        names = [sequence_name(s.description) for s in cluster]
        unnamed = [s for s, n in zip(cluster, names) if not n or is_placeholder([n])]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if unnamed or repeated:
            problem = (
                f"{', '.join(s.label for s in unnamed)} of the same grid have no usable SeriesDescription"
                if unnamed else f"series of the same grid share the sequence name(s) {', '.join(repeated)}"
            )  # fmt: skip
            why.update({s.key: problem for s in cluster})
            continue
        stacked.append(cluster)
    return stacked, why


@dataclass
class FolderPlan:
    """How the DICOM files of one folder become sources.

    Attributes:
        stacks: the series to stack, one entry per image: ``(files, channel names in channel order)``.
        separate: the other series, ``(index, files)``, ``index`` counting every series of the folder
            in the order of their first file (the ``_s<index>`` suffix ingest names them by).
        n_series: how many series the folder holds.
        note: which series were kept separate and why (``""``: nothing to say).
    """

    stacks: list[tuple[tuple[str, ...], list[str]]]
    separate: list[tuple[int, tuple[str, ...]]]
    n_series: int
    note: str = ""


def plan_folder(files: Sequence[str], stack: bool = True) -> FolderPlan:
    """Group the DICOM ``files`` of one folder into series, and the series into stacks (``stack``).

    With ``stack`` off every series is separate, as before stacking existed. The note is written when
    the folder holds two or more series of several files or frames (volumes, or series meant to be) and
    not all of its series were stacked.
    """
    series = _scan(sorted(files))
    ordered = sorted(series.values(), key=lambda s: sorted(s.paths)[0])
    groups: list[list[_Series]] = []
    why: dict[str, str] = {}
    if stack and len(ordered) > 1:
        groups, why = _groups(ordered)
    in_stack = {s.key for group in groups for s in group}
    stacks = [
        (tuple(sorted(p for s in group for p in s.paths)),
         ordered_sequences([sequence_name(s.description) for s in group]))
        for group in groups
    ]
    separate = [(i, tuple(sorted(s.paths))) for i, s in enumerate(ordered) if s.key not in in_stack]
    left = [s for s in ordered if s.key not in in_stack]
    note = ""
    if stack and left and sum(len(s.paths) > 1 or s.frames > 1 for s in ordered) > 1:
        reasons = "; ".join(f"{s.label}: {why.get(s.key) or 'not stacked'}" for s in left)
        note = f"{len(left)} DICOM series kept as separate images, not channels: {reasons}"
    return FolderPlan(stacks, separate, len(ordered), note)


def read_dicom_case(source: Source) -> Iterator[Record]:
    """The series of ``source`` as one image: channels ``(C, I, J, K)`` named by :func:`sequence_name`.

    A series that cannot be read (a corrupt file, its slices changed since discovery) is left out and
    reported after the image of the others is yielded (:class:`ReadError`); nothing is resampled.
    """
    series = _scan(source.paths)
    volumes: dict[str, tuple[np.ndarray, np.ndarray, _Series, str]] = {}
    failed: list[str] = []
    for s in sorted(series.values(), key=lambda s: sorted(s.paths)[0]):
        name = sequence_name(s.description)
        try:
            if s.problem or not name or name in volumes:
                raise ReadError(s.problem or (f"another series is named {name!r} too" if name else "no SeriesDescription"))
            datasets = read_datasets(sorted(s.paths))
            volume, affine = series_volume(datasets)
        except Exception as exc:
            reason = str(exc) if isinstance(exc, ReadError) else f"{type(exc).__name__}: {exc}"
            failed.append(f"{s.label} ({len(s.paths)} files): {reason}")
            continue
        volumes[name] = (volume, affine, s, str(getattr(datasets[0], "Modality", "")))
    channels = ordered_sequences(list(volumes))
    if channels:
        first = volumes[channels[0]]
        for name in channels[1:]:
            volume, affine, s, _ = volumes[name]
            if volume.shape != first[0].shape or not np.allclose(affine, first[1], atol=AFFINE_TOLERANCE):
                raise ReadError(
                    f"inconsistent DICOM case: {name!r} is {volume.shape}, {channels[0]!r} is {first[0].shape} "
                    "or their affines differ (files changed since discovery?); ingest with --no-series-channels"
                )
        arrays = [volumes[n][0] for n in channels]
        dtype = np.result_type(*arrays)
        modalities = {volumes[n][3] for n in channels}
        yield Record(
            name=source.name,
            array=np.stack([a.astype(dtype, copy=False) for a in arrays]),
            affine=first[1],
            modality=modalities.pop() if len(modalities) == 1 else "",
            channel_names=tuple(channels),
            source=str(Path(source.paths[0]).parent),
            extra={
                "study_uid": first[2].study,
                "series": {
                    n: {"description": volumes[n][2].description, "series_uid": volumes[n][2].key,
                        "n_files": len(volumes[n][2].paths)}
                    for n in channels
                },
            },
        )  # fmt: skip
    if failed:
        kept = f"the image holds the other series as channels {', '.join(channels)}" if channels else "no image"
        raise ReadError(f"{len(failed)} of {len(series)} DICOM series left out ({kept}): " + "; ".join(failed))
