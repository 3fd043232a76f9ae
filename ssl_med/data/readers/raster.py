"""PNG / JPEG / BMP (Pillow) and TIFF (tifffile, incl. multi-page and multi-channel) images."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ssl_med.data.channels import GRAY
from ssl_med.data.readers.base import ReadError, Record, Source

TIFF_SUFFIXES = (".tif", ".tiff")
PIL_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")
CHANNEL_AXES = "CS"  # tifffile axis codes: channel, sample (RGB)
DEPTH_AXES = "ZQI"  # z-stack, unknown page axis, image sequence


def _pil(path: str) -> tuple[np.ndarray, tuple[str, ...]]:
    from PIL import Image

    with Image.open(path) as im:
        if im.mode == "P":
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        if im.mode == "LA":
            im = im.convert("L")
        data = np.asarray(im)
    if data.ndim == 2:
        return data[None], (GRAY,)
    if data.shape[-1] == 4 and np.all(data[..., 3] == data[..., 3].max()):
        data = data[..., :3]  # constant alpha carries nothing
    names = ("R", "G", "B", "A")[: data.shape[-1]]
    return np.moveaxis(data, -1, 0), names


def _tiff(path: str) -> tuple[np.ndarray, tuple[str, ...]]:
    import tifffile

    with tifffile.TiffFile(path) as tif:
        series = tif.series[0]
        axes, data = series.axes, series.asarray()
    if "T" in axes and data.shape[axes.index("T")] > 1:
        raise ReadError(f"time-lapse TIFF (axes {axes}) is not supported")
    keep = []
    for i, a in enumerate(axes):  # drop singleton axes we do not model (T, ...)
        if a not in "YX" + CHANNEL_AXES + DEPTH_AXES and data.shape[i] == 1:
            continue
        keep.append(i)
    data = data.reshape([data.shape[i] for i in keep])
    axes = "".join(axes[i] for i in keep)
    if set(axes) - set("YX" + CHANNEL_AXES + DEPTH_AXES):
        raise ReadError(f"TIFF axes {axes} are not supported")
    chan = [i for i, a in enumerate(axes) if a in CHANNEL_AXES]
    depth = [i for i, a in enumerate(axes) if a in DEPTH_AXES]
    if len(depth) > 1:
        raise ReadError(f"TIFF axes {axes}: more than one depth axis")
    order = chan + depth + [axes.index("Y"), axes.index("X")]
    data = np.transpose(data, order)
    n_chan = int(np.prod([data.shape[i] for i in range(len(chan))])) if chan else 1
    data = data.reshape(n_chan, *data.shape[len(chan) :])
    names = ("R", "G", "B") if axes.count("S") and n_chan == 3 else tuple(f"ch{i}" for i in range(n_chan))
    if n_chan == 1:
        names = (GRAY,)
    return data, names


def read_raster(source: Source) -> Iterator[Record]:
    path = source.paths[0]
    if Path(path).stat().st_size == 0:
        raise ReadError("zero-size file")
    data, names = _tiff(path) if Path(path).suffix.lower() in TIFF_SUFFIXES else _pil(path)
    if data.dtype == bool:
        data = data.astype(np.uint8)
    yield Record(
        name=source.name, array=np.ascontiguousarray(data), spacing=(1.0,) * (data.ndim - 1), unit="",
        channel_names=names, source=str(path),
    )  # fmt: skip
