"""NumPy ``.npy`` arrays: ``(Y, X)``, ``(Y, X, 3|4)`` (RGB), ``(Z, Y, X)`` or ``(C, Z, Y, X)``."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ssl_med.data.readers.base import ReadError, Record, Source


def as_image(data: np.ndarray) -> np.ndarray:
    """``(C, *spatial)`` from a plain array (see the module docstring for the accepted shapes)."""
    if data.ndim == 2:
        return data[None]
    if data.ndim == 3 and data.shape[-1] in (3, 4) and data.shape[0] > 4:
        return np.moveaxis(data, -1, 0)
    if data.ndim == 3:
        return data[None]
    if data.ndim == 4:
        return data
    raise ReadError(f"unsupported array shape {data.shape}")


def read_npy(source: Source) -> Iterator[Record]:
    path = source.paths[0]
    if Path(path).stat().st_size == 0:
        raise ReadError("zero-size file")
    data = as_image(np.load(path, allow_pickle=False))
    yield Record(
        name=source.name, array=np.ascontiguousarray(data), spacing=(1.0,) * (data.ndim - 1), unit="",
        source=str(path),
    )  # fmt: skip
