"""The types every reader shares: :class:`Source` (a unit of ingest work), :class:`Record` /
:class:`StackRecord` (what a reader yields) and :class:`ReadError`. They live apart from
:mod:`ssl_med.data.readers` so that the reader modules import them without importing the package
that dispatches to them."""

from __future__ import annotations

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
    """One unit of ingest work: ``kind`` names the reader :func:`~ssl_med.data.readers.read_source` calls; ``paths`` its files."""

    kind: str
    paths: tuple[str, ...]
    name: str

    def describe(self) -> str:
        return self.paths[0] if len(self.paths) == 1 else f"{self.paths[0]} (+{len(self.paths) - 1} files)"
