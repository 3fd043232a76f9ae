"""DICOM series: slices sorted by position along the slice normal, rescale slope/intercept applied.

A series is a volume either as several single-frame files (one slice each, ``ImagePositionPatient``)
or as one enhanced multi-frame file (``NumberOfFrames`` > 1), whose frames' planes, pixel spacing and
rescale are in its functional groups (``PerFrameFunctionalGroupsSequence``, shared ones in
``SharedFunctionalGroupsSequence``). Both give one voxel grid and RAS affine (:func:`series_geometry`),
so both can be stacked as channels (:mod:`~ssl_med.data.readers.dicom_case`). A multi-frame file without
per-frame positions is still read, with a diagonal affine from its spacing.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ssl_med.data.channels import GRAY
from ssl_med.data.readers.base import ReadError, Record, Source

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def is_dicom(path: str | Path) -> bool:
    """True for ``.dcm`` files and files with the ``DICM`` preamble marker."""
    p = Path(path)
    if p.suffix.lower() == ".dcm":
        return True
    try:
        with open(p, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def _rescaled(ds) -> np.ndarray:
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
    return _rescale(ds.pixel_array, slope, intercept)


def _rescale(pixels: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    if slope == 1.0 and intercept == 0.0:
        return pixels
    return pixels.astype(np.float64) * slope + intercept


def _compact(array: np.ndarray) -> np.ndarray:
    """int16 when the rescaled values are integers in range (CT HU), else float32."""
    if array.dtype.kind in "iu" and array.dtype.itemsize <= 2:
        return array
    if np.all(np.mod(array, 1) == 0) and array.min() >= -32768 and array.max() <= 32767:
        return array.astype(np.int16)
    return array.astype(np.float32)


def read_datasets(paths: Sequence[str]) -> list:
    """The files of a series, read and their pixels decoded (a truncated file fails here, with its name).

    Raises:
        ReadError: a zero-size or corrupt file.
    """
    import pydicom

    datasets = []
    for path in paths:
        if Path(path).stat().st_size == 0:
            raise ReadError(f"zero-size file {path}")
        try:
            ds = pydicom.dcmread(path)
            _ = ds.pixel_array
        except Exception as exc:
            raise ReadError(f"corrupt DICOM file {Path(path).name}: {type(exc).__name__}: {exc}") from exc
        datasets.append(ds)
    return datasets


def read_series(source: Source) -> Iterator[Record]:
    """One image per series: 2D ``(1, Y, X)`` for a single slice, else a volume with its RAS affine."""
    datasets = read_datasets(source.paths)
    first = datasets[0]
    modality = str(getattr(first, "Modality", ""))
    extra = {"series_uid": str(getattr(first, "SeriesInstanceUID", "")), "n_files": len(datasets)}
    if len(datasets) == 1 and int(getattr(first, "NumberOfFrames", 1) or 1) == 1:
        pixels = _rescaled(first)
        if pixels.ndim == 3 and pixels.shape[-1] in (3, 4):  # RGB (e.g. ultrasound, photos)
            pixels = np.moveaxis(pixels, -1, 0)[:3]
            names = ("R", "G", "B")
        else:
            pixels, names = pixels[None], (GRAY,)
        spacing = tuple(float(s) for s in getattr(first, "PixelSpacing", (1.0, 1.0)))
        yield Record(
            name=source.name, array=_compact(pixels), spacing=spacing, modality=modality,
            channel_names=names, source=source.paths[0], extra=extra,
        )  # fmt: skip
        return
    yield _volume(source, datasets, modality, extra)


def _volume(source: Source, datasets: list, modality: str, extra: dict) -> Record:
    first = datasets[0]
    if len(datasets) == 1:  # multi-frame: frames are slices
        try:
            volume, affine = series_volume(datasets)
            return Record(
                name=source.name, array=volume[None], affine=affine, modality=modality, source=source.paths[0],
                extra={**extra, "geometry": "multi-frame"},
            )  # fmt: skip
        except ReadError:  # no per-frame positions (or not one stack): frames in file order, diagonal affine
            pass
        frames = _rescaled(first)
        thickness = float(
            getattr(first, "SpacingBetweenSlices", 0) or getattr(first, "SliceThickness", 1.0) or 1.0
        )
        row_sp, col_sp = (float(s) for s in getattr(first, "PixelSpacing", (1.0, 1.0)))
        affine = np.diag([col_sp, row_sp, thickness, 1.0])
        return Record(
            name=source.name, array=_compact(frames.transpose(2, 1, 0)[None]), affine=affine,
            modality=modality, source=source.paths[0], extra={**extra, "geometry": "multi-frame, no position"},
        )  # fmt: skip
    volume, affine = series_volume(datasets)
    return Record(
        name=source.name, array=volume[None], affine=affine, modality=modality,
        source=str(Path(source.paths[0]).parent), extra=extra,
    )  # fmt: skip


def series_volume(datasets: Sequence) -> tuple[np.ndarray, np.ndarray]:
    """The volume ``(I, J, K)`` of a series (rescaled, compacted) and its RAS affine: decoded single-frame
    slices, or one decoded multi-frame file (:func:`series_geometry`)."""
    order, _shape, affine = series_geometry(datasets)
    if is_multiframe(datasets):
        pixels = datasets[0].pixel_array.reshape(-1, int(datasets[0].Rows), int(datasets[0].Columns))
        slices = [_rescale(pixels[i], *_frame_rescale(datasets[0], i)) for i in order]
    else:
        slices = [_rescaled(datasets[i]) for i in order]
    volume = np.stack(slices).transpose(2, 1, 0)  # (K, rows=J, cols=I) -> (I, J, K)
    return _compact(volume), affine


def is_multiframe(datasets: Sequence) -> bool:
    """True for a series of one file with ``NumberOfFrames`` > 1."""
    return len(datasets) == 1 and int(getattr(datasets[0], "NumberOfFrames", 1) or 1) > 1


def series_geometry(datasets: Sequence) -> tuple[list[int], tuple[int, int, int], np.ndarray]:
    """The grid of a series from its headers alone: :func:`frame_geometry` of one multi-frame file,
    else :func:`slice_geometry` of single-frame slices."""
    return frame_geometry(datasets[0]) if is_multiframe(datasets) else slice_geometry(datasets)


def slice_geometry(datasets: Sequence) -> tuple[list[int], tuple[int, int, int], np.ndarray]:
    """The grid of a series of single-frame slices, from their headers alone (pixels need not be read).

    Returns:
        ``(order, shape, affine)``: the slice indices in position order along the slice normal, the
        voxel grid ``(I, J, K)`` = ``(columns, rows, slices)`` and its 4x4 voxel -> world RAS affine.

    Raises:
        ReadError: slices of different sizes or orientations, a slice without position, two slices at
            one position, or uneven spacing (missing slices).
    """
    shapes = {(int(d.Rows), int(d.Columns)) for d in datasets}
    if len(shapes) > 1:
        raise ReadError(f"inconsistent series: slices of sizes {sorted(shapes)}")
    try:
        orient = np.array([[float(v) for v in d.ImageOrientationPatient] for d in datasets])
        positions = np.array([[float(v) for v in d.ImagePositionPatient] for d in datasets])
    except AttributeError as exc:
        raise ReadError(f"inconsistent series: a slice has no position/orientation ({exc})") from exc
    spacing = [float(v) for v in datasets[0].PixelSpacing]
    return plane_grid(shapes.pop(), orient, positions, spacing)


def frame_geometry(ds) -> tuple[list[int], tuple[int, int, int], np.ndarray]:
    """The grid of an enhanced multi-frame file from its header (as :func:`slice_geometry`, frames as
    slices): each frame's ``PlanePositionSequence`` and ``PlaneOrientationSequence`` and the
    ``PixelMeasuresSequence``, per frame or shared (top-level attributes as a fallback).

    Raises:
        ReadError: a frame without position or orientation, or frames that are not one evenly spaced
            stack (several stacks, or time points at one position).
    """
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    try:
        orient = np.array([[float(v) for v in _frame_attr(ds, i, "PlaneOrientationSequence", "ImageOrientationPatient")]
                           for i in range(frames)])  # fmt: skip
        positions = np.array([[float(v) for v in _frame_attr(ds, i, "PlanePositionSequence", "ImagePositionPatient")]
                              for i in range(frames)])  # fmt: skip
        spacing = [float(v) for v in _frame_attr(ds, 0, "PixelMeasuresSequence", "PixelSpacing")]
    except AttributeError as exc:
        raise ReadError(f"a multi-frame file without per-frame plane positions/orientations ({exc})") from None
    try:
        return plane_grid((int(ds.Rows), int(ds.Columns)), orient, positions, spacing)
    except ReadError as exc:
        raise ReadError(f"a multi-frame file whose frames are not one volume: {exc}") from exc


def plane_grid(
    size: tuple[int, int], orient: np.ndarray, positions: np.ndarray, pixel_spacing: Sequence[float]
) -> tuple[list[int], tuple[int, int, int], np.ndarray]:
    """``(order, shape, affine)`` of ``N`` planes of ``size`` ``(rows, columns)`` with orientations
    ``orient`` ``(N, 6)`` and positions ``positions`` ``(N, 3)`` (LPS, mm), ``pixel_spacing`` ``(row,
    column)`` mm (see :func:`slice_geometry`)."""
    if not np.allclose(orient, orient[0], atol=1e-4):
        raise ReadError("inconsistent series: slices have different orientations")
    row_dir, col_dir = orient[0, :3], orient[0, 3:]
    normal = np.cross(row_dir, col_dir)
    along = positions @ normal
    order = np.argsort(along, kind="stable")
    gaps = np.diff(along[order])
    if np.any(gaps < 1e-3):
        raise ReadError("inconsistent series: two slices at the same position")
    step = float(np.median(gaps))
    if np.any(np.abs(gaps - step) > 0.1 * step):
        raise ReadError(
            f"inconsistent series: uneven slice spacing {gaps.min():.2f}-{gaps.max():.2f} mm (missing slices?)"
        )
    row_sp, col_sp = (float(s) for s in pixel_spacing)
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_dir * col_sp  # i (columns) runs along the row direction
    affine_lps[:3, 1] = col_dir * row_sp
    affine_lps[:3, 2] = normal * step
    affine_lps[:3, 3] = positions[order[0]]
    rows, cols = size
    return [int(i) for i in order], (cols, rows, len(positions)), LPS_TO_RAS @ affine_lps


_REQUIRED = object()


def _frame_attr(ds, frame: int, group: str, name: str, default: Any = _REQUIRED):
    """``name`` of ``group`` (a functional-group macro) for ``frame``: per-frame, else shared, else the
    top-level attribute, else ``default``; raises ``AttributeError`` when none has it and there is no
    default."""
    for groups in ("PerFrameFunctionalGroupsSequence", "SharedFunctionalGroupsSequence"):
        items = getattr(ds, groups, None)
        if not items:
            continue
        item = items[frame if groups.startswith("PerFrame") and frame < len(items) else 0]
        macro = getattr(item, group, None)
        if macro and name in macro[0]:
            return getattr(macro[0], name)
    if name in ds:
        return getattr(ds, name)
    if default is not _REQUIRED:
        return default
    raise AttributeError(f"no {group} and no {name}")


def _frame_rescale(ds, frame: int) -> tuple[float, float]:
    """``(slope, intercept)`` of ``frame`` (``PixelValueTransformationSequence`` or top-level, else 1, 0)."""
    group = "PixelValueTransformationSequence"
    slope = float(_frame_attr(ds, frame, group, "RescaleSlope", None) or 1.0)
    intercept = float(_frame_attr(ds, frame, group, "RescaleIntercept", None) or 0.0)
    return slope, intercept
