"""User-given channel names at ingest: ``ssl_med ingest --channel-names T1,T1ce,T2,FLAIR``.

Some multi-channel inputs carry no names for their channels: a 4D NIfTI whose 4th axis holds the
sequences (the Medical Segmentation Decathlon's BrainTumour task stores FLAIR, T1w, T1gd, T2w so), a
multi-channel TIFF (axis ``C``), a ``(C, Z, Y, X)`` NumPy array. The store would name them ``ch0,
ch1, ...``, which ssl_med treats as *unnamed* (:func:`ssl_med.data.channels.is_placeholder`), so
``data.channels`` cannot select them and ChAda-ViT falls back to per-slot embeddings.
``--channel-names`` gives them names, in channel order.

Which names win: **names read from the files**. A BraTS case folder's suffixes (``_t1 _t1ce _t2
_flair``), colour images (``R G B``) and grey PNG/JPEG/TIFF (``gray``) keep their own names: those are
tied to each channel's file or colour, while ``--channel-names`` is positional and would misname a
case that lacks a sequence. The given names **complement** them: they name every image whose channels
carry no name of their own and whose channel count is the number of names. An unnamed image with
another number of channels (more than one) is an error, reported for every such file **before
anything is read or written** (:func:`check_channel_names`, from the file headers); an unnamed
single-channel image is left as it is unless exactly one name is given.

The names are written to the manifest's ``channel_names``, the field the readers fill, so crops,
batches (``"channel_names"``), ``data.channels`` and ChAda-ViT's channel vocabulary use them as
they use names found in files. Images already in the store (re-runs) keep the names they were
written with, also when ``--verify --repair`` rewrites them from their files.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

from ssl_med.data.channels import SEPARATOR, is_placeholder
from ssl_med.data.readers.base import ReadError, Record, Source, StackRecord


class ChannelNamesError(ValueError):
    """``--channel-names`` that are malformed, or that do not fit the channels of some inputs."""


def parse_channel_names(names: str | Iterable[str]) -> tuple[str, ...]:
    """``"T1,T1ce,T2,FLAIR"`` (or a list of names) -> ``("T1", "T1ce", "T2", "FLAIR")``, checked.

    Names are stripped and kept as written (ssl_med matches them case-insensitively); they must be
    non-empty, distinct ignoring case, without ``|`` (the separator of a batch's names) and not of the
    store's placeholder form ``ch<digits>``.
    """
    parts = names.split(",") if isinstance(names, str) else list(names)
    out = tuple(str(n).strip() for n in parts)
    if not out or any(not n for n in out):
        raise ChannelNamesError(f"channel names must be non-empty and comma-separated, got {names!r}")
    lower = [n.lower() for n in out]
    repeated = sorted({n for n in out if lower.count(n.lower()) > 1})
    if repeated:
        raise ChannelNamesError(f"channel names must be distinct (ignoring case): {repeated} repeated")
    if any(SEPARATOR in n for n in out):
        raise ChannelNamesError(f"channel names may not contain {SEPARATOR!r}: {list(out)}")
    placeholders = [n for n in out if is_placeholder([n])]
    if placeholders:
        raise ChannelNamesError(f"{placeholders}: names of the form ch<N> mean 'unnamed' to ssl_med; choose others")
    return out


def unnamed_channels(source: Source) -> int | None:
    """The channel count of the image ``source`` will give when its reader names no channels, read
    from the file's header only; ``None`` when the reader names them (case folders, PNG/JPEG, MedMNIST,
    RGB and grey TIFF), for DICOM (one channel, or named RGB) or when the header cannot be read (the
    ingest then reports the file)."""
    path = source.paths[0]
    try:
        if source.kind == "nifti":
            import nibabel as nib

            shape = nib.load(path).header.get_data_shape()
            return int(shape[3]) if len(shape) == 4 else 1
        if source.kind == "numpy":
            import numpy as np

            from ssl_med.data.readers.numpy_array import as_image

            return int(as_image(np.load(path, mmap_mode="r", allow_pickle=False)).shape[0])
        if source.kind == "raster" and Path(path).suffix.lower() in (".tif", ".tiff"):
            return _tiff_unnamed_channels(path)
    except Exception:  # unreadable: the reader reports it, with its reason, when the source is ingested
        return None
    return None


def _tiff_unnamed_channels(path: str) -> int | None:
    """Channels of a TIFF's first series from its axes (as :func:`ssl_med.data.readers.raster._tiff`
    counts them), ``None`` for the ones it names (one channel: ``gray``; 3 samples: ``R G B``)."""
    import tifffile

    from ssl_med.data.readers.raster import CHANNEL_AXES

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        axes, shape = series.axes, series.shape
    count = math.prod(n for a, n in zip(axes, shape) if a in CHANNEL_AXES)
    if count == 1 or ("S" in axes and count == 3):
        return None
    return count


def check_channel_names(sources: Sequence[Source], names: Sequence[str]) -> None:
    """Raise :class:`ChannelNamesError` naming every input whose unnamed channels are not ``names``
    (one per channel); single-channel inputs pass (see the module docstring)."""
    bad = []
    for source in sources:
        count = unnamed_channels(source)
        if count is not None and count > 1 and count != len(names):
            bad.append(f"  {source.describe()}: {count} channels")
    if bad:
        raise ChannelNamesError(
            f"--channel-names gives {len(names)} names ({','.join(names)}) but these inputs have another number "
            "of unnamed channels:\n" + "\n".join(bad) + "\nnothing was ingested; ingest them separately, with "
            "their own --channel-names"
        )


def name_channels(record: Record | StackRecord, names: Sequence[str]) -> Record | StackRecord:
    """``record`` with ``names`` as its channel names when it has none of its own and as many channels;
    unchanged when its reader named its channels, or when it is single-channel and more names are given.

    Raises:
        ReadError: an unnamed multi-channel record with another channel count (the header check,
            :func:`check_channel_names`, normally stops this before any work).
    """
    if record.channel_names and not is_placeholder(record.channel_names):
        return record
    count = record.images.shape[1] if isinstance(record, StackRecord) else record.array.shape[0]
    if count == len(names):
        return dataclasses.replace(record, channel_names=tuple(names))
    if count == 1:
        return record
    raise ReadError(f"{count} unnamed channels but --channel-names gives {len(names)} ({','.join(names)})")
