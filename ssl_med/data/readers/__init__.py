"""Readers for the inputs of ``ssl_med ingest``: each turns a source into :class:`Record` objects.

A :class:`Source` is one unit of ingest work found by :func:`~ssl_med.data.readers.discover.discover`
(a NIfTI file, a case folder of NIfTI sequences, a DICOM series, the DICOM series of one study
stacked as channels, a raster image, a MedMNIST ``.npz``, a ``.npy`` array). :func:`read_source`
dispatches to the reader of its kind. Readers raise :class:`ReadError` with a human-readable reason
for inputs that cannot become an image.
"""

from __future__ import annotations

from collections.abc import Iterator

from ssl_med.data.readers.base import ReadError, Record, Source, StackRecord

__all__ = ["ReadError", "Record", "Source", "StackRecord", "read_source"]


def read_source(source: Source) -> Iterator[Record | StackRecord]:
    """The records of ``source`` (raises :class:`ReadError` or the library's error when unreadable)."""
    from ssl_med.data.readers import dicom, dicom_case, medmnist, nifti, numpy_array, raster

    readers = {
        "nifti": nifti.read_nifti_source,
        "case": nifti.read_case,
        "dicom": dicom.read_series,
        dicom_case.KIND: dicom_case.read_dicom_case,
        "raster": raster.read_raster,
        "medmnist": medmnist.read_medmnist,
        "numpy": numpy_array.read_npy,
    }
    if source.kind not in readers:
        raise ReadError(f"no reader for kind {source.kind!r}")
    yield from readers[source.kind](source)
