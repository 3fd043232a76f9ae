"""Readers for the inputs of ``ssl_med ingest``: each turns a source into :class:`Record` objects.

A :class:`Source` is one unit of ingest work found by :func:`~ssl_med.data.readers.discover.discover`
(a NIfTI file, a case folder of NIfTI sequences, a DICOM series, a raster image, a MedMNIST ``.npz``,
a ``.npy`` array). :func:`read_source` dispatches to the reader of its kind. Readers raise
:class:`ReadError` with a human-readable reason for inputs that cannot become an image.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np


class ReadError(ValueError):
    """An input that cannot be ingested; the message is the reason shown to the user."""


@dataclass
class Record:
    """One image read from a source, before preprocessing.

    Attributes:
        name: image name in the store.
        array: ``(C, I, J, K)`` in voxel order when ``affine`` is given (NIfTI/DICOM volumes), else
            ``(C, *spatial)`` already in storage order ``(C, Z, Y, X)`` / ``(C, Y, X)``.
        spacing: storage-order spacing (used when ``affine`` is ``None``).
        affine: 4x4 voxel ``(i, j, k)`` -> world RAS (mm) affine, or ``None``.
        labels: label maps, same spatial layout as ``array`` (no channel axis).
    """

    name: str
    array: np.ndarray
    spacing: tuple[float, ...] = ()
    affine: np.ndarray | None = None
    modality: str = ""
    channel_names: tuple[str, ...] = ()
    source: str = ""
    split: str = ""
    label: list[int] | None = None
    labels: dict[str, np.ndarray] = field(default_factory=dict)
    unit: str = "millimeter"
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class StackRecord:
    """Many small images of one shape (a MedMNIST split): ``images`` is ``(N, C, *spatial)``."""

    name: str
    images: np.ndarray
    names: list[str]
    labels: list[list[int]]
    split: str
    spacing: tuple[float, ...]
    channel_names: tuple[str, ...]
    source: str
    modality: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Source:
    """One unit of ingest work: ``kind`` is a key of :data:`READERS`; ``paths`` its files."""

    kind: str
    paths: tuple[str, ...]
    name: str

    def describe(self) -> str:
        return self.paths[0] if len(self.paths) == 1 else f"{self.paths[0]} (+{len(self.paths) - 1} files)"


def read_source(source: Source) -> Iterator[Record | StackRecord]:
    """The records of ``source`` (raises :class:`ReadError` or the library's error when unreadable)."""
    from ssl_med.data.readers import dicom, medmnist, nifti, numpy_array, raster

    readers = {
        "nifti": nifti.read_nifti_source,
        "case": nifti.read_case,
        "dicom": dicom.read_series,
        "raster": raster.read_raster,
        "medmnist": medmnist.read_medmnist,
        "numpy": numpy_array.read_npy,
    }
    if source.kind not in readers:
        raise ReadError(f"no reader for kind {source.kind!r}")
    yield from readers[source.kind](source)
