"""DICOM series: slices sorted by position along the slice normal, rescale slope/intercept applied."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

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


def series_key(path: str) -> str:
    """SeriesInstanceUID of a file (header only); the path itself when the header is unreadable."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        return str(getattr(ds, "SeriesInstanceUID", "")) or f"file:{path}"
    except Exception:  # an unreadable file is its own (failing) series, reported at read time
        return f"file:{path}"


def _rescaled(ds) -> np.ndarray:
    pixels = ds.pixel_array
    slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
    intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
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


def read_series(source: Source) -> Iterator[Record]:
    """One image per series: 2D ``(1, Y, X)`` for a single slice, else a volume with its RAS affine."""
    import pydicom

    datasets = []
    for path in source.paths:
        if Path(path).stat().st_size == 0:
            raise ReadError(f"zero-size file {path}")
        try:
            ds = pydicom.dcmread(path)
            _ = ds.pixel_array  # decode now: a truncated file fails here, with its name
        except Exception as exc:
            raise ReadError(f"corrupt DICOM file {Path(path).name}: {type(exc).__name__}: {exc}") from exc
        datasets.append(ds)
    first = datasets[0]
    modality = str(getattr(first, "Modality", ""))
    extra = {"series_uid": str(getattr(first, "SeriesInstanceUID", "")), "n_files": len(datasets)}
    if len(datasets) == 1 and int(getattr(first, "NumberOfFrames", 1) or 1) == 1:
        pixels = _rescaled(first)
        if pixels.ndim == 3 and pixels.shape[-1] in (3, 4):  # RGB (e.g. ultrasound, photos)
            pixels = np.moveaxis(pixels, -1, 0)[:3]
            names = ("R", "G", "B")
        else:
            pixels, names = pixels[None], ("gray",)
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
    shapes = {(int(d.Rows), int(d.Columns)) for d in datasets}
    if len(shapes) > 1:
        raise ReadError(f"inconsistent series: slices of sizes {sorted(shapes)}")
    try:
        orient = np.array([[float(v) for v in d.ImageOrientationPatient] for d in datasets])
        positions = np.array([[float(v) for v in d.ImagePositionPatient] for d in datasets])
    except AttributeError as exc:
        raise ReadError(f"inconsistent series: a slice has no position/orientation ({exc})") from exc
    if not np.allclose(orient, orient[0], atol=1e-4):
        raise ReadError("inconsistent series: slices have different orientations")
    row_dir, col_dir = orient[0, :3], orient[0, 3:]
    normal = np.cross(row_dir, col_dir)
    along = positions @ normal
    order = np.argsort(along)
    gaps = np.diff(along[order])
    if np.any(gaps < 1e-3):
        raise ReadError("inconsistent series: two slices at the same position")
    step = float(np.median(gaps))
    if np.any(np.abs(gaps - step) > 0.1 * step):
        raise ReadError(
            f"inconsistent series: uneven slice spacing {gaps.min():.2f}-{gaps.max():.2f} mm (missing slices?)"
        )
    slices = [_rescaled(datasets[i]) for i in order]
    volume = np.stack(slices).transpose(2, 1, 0)  # (K, rows=J, cols=I) -> (I, J, K)
    row_sp, col_sp = (float(s) for s in first.PixelSpacing)
    affine_lps = np.eye(4)
    affine_lps[:3, 0] = row_dir * col_sp  # i (columns) runs along the row direction
    affine_lps[:3, 1] = col_dir * row_sp
    affine_lps[:3, 2] = normal * step
    affine_lps[:3, 3] = positions[order[0]]
    return Record(
        name=source.name, array=_compact(volume)[None], affine=LPS_TO_RAS @ affine_lps, modality=modality,
        source=str(Path(source.paths[0]).parent), extra=extra,
    )  # fmt: skip
