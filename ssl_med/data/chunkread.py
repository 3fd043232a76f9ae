"""The ``direct`` read engine: regions of a local zarr v3 array decoded straight from its chunk files.

zarr-python routes every read through its asyncio codec pipeline, which costs milliseconds of
Python overhead per crop; a 96³ crop touches only 8-27 chunks, so for local stores reading those
files and Blosc-decoding them in a plain loop is several times faster (measured in
``docs/benchmarks/data.md``). Only the simple layout ssl_med writes is handled: a regular chunk grid,
``bytes`` (+ ``blosc`` or ``zstd``) codecs, no sharding or transposes. Anything else returns
``None`` from :meth:`ChunkReader.open` and callers fall back to zarr-python.
"""

from __future__ import annotations

import itertools
import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from numcodecs import Blosc, Zstd

_DECODERS = {"blosc": Blosc, "zstd": Zstd}


class ChunkReader:
    """Reads ``(start:stop)`` selections of one unsharded zarr v3 array (local filesystem only).

    Args:
        path: folder of the array (holding its ``zarr.json``).
        meta: the parsed ``zarr.json``.
    """

    def __init__(self, path: Path, meta: dict) -> None:
        self.path = str(path)
        self.shape = tuple(meta["shape"])
        self.chunks = tuple(meta["chunk_grid"]["configuration"]["chunk_shape"])
        codecs = meta["codecs"]
        endian = codecs[0].get("configuration", {}).get("endian", "little")
        self.dtype = np.dtype(meta["data_type"]).newbyteorder("<" if endian == "little" else ">")
        fill = meta.get("fill_value", 0)
        self.fill_value = float(fill) if isinstance(fill, str) else fill  # "NaN", "Infinity"
        self.decoder = _DECODERS[codecs[1]["name"]]() if len(codecs) > 1 else None
        encoding = meta["chunk_key_encoding"]
        self.separator = encoding.get("configuration", {}).get("separator", "/")
        self.prefix = "c" + self.separator if encoding["name"] == "default" else ""

    @classmethod
    def open(cls, path: str | os.PathLike[str]) -> ChunkReader | None:
        """A reader for the array at ``path``, or ``None`` if its layout is not a supported one."""
        try:
            meta = json.loads((Path(path) / "zarr.json").read_text())
        except (OSError, ValueError):
            return None
        codecs = meta.get("codecs", [])
        if (
            meta.get("node_type") != "array"
            or meta.get("chunk_grid", {}).get("name") != "regular"
            or meta.get("storage_transformers")
            or not codecs
            or codecs[0]["name"] != "bytes"
            or len(codecs) > 2
            or (len(codecs) == 2 and codecs[1]["name"] not in _DECODERS)
            or meta.get("chunk_key_encoding", {}).get("name") not in ("default", "v2")
            or not isinstance(meta.get("data_type"), str)
        ):
            return None
        try:
            np.dtype(meta["data_type"])
        except TypeError:
            return None
        return cls(Path(path), meta)

    def _chunk(self, index: Sequence[int]) -> np.ndarray | None:
        key = self.prefix + self.separator.join(str(i) for i in index)
        try:
            with open(os.path.join(self.path, *key.split("/")), "rb") as f:
                raw = f.read()
        except FileNotFoundError:  # never written: all fill_value
            return None
        data = self.decoder.decode(raw) if self.decoder is not None else raw
        return np.frombuffer(data, dtype=self.dtype).reshape(self.chunks)

    def read(self, selection: Sequence[slice]) -> np.ndarray:
        """The array under ``selection`` (one ``slice`` per axis, step 1), as a new native-endian array."""
        if len(selection) != len(self.shape):
            raise IndexError(f"selection has {len(selection)} axes, array has {len(self.shape)}")
        bounds = [s.indices(n)[:2] for s, n in zip(selection, self.shape)]
        if any(s.step not in (None, 1) for s in selection):
            raise IndexError("only unit-step slices are supported")
        out = np.empty([max(hi - lo, 0) for lo, hi in bounds], dtype=self.dtype.newbyteorder("="))
        if out.size == 0:
            return out
        grid = [range(lo // c, (hi - 1) // c + 1) for (lo, hi), c in zip(bounds, self.chunks)]
        for index in itertools.product(*grid):
            src, dst = [], []
            for i, (lo, hi), c in zip(index, bounds, self.chunks):
                a, b = max(lo, i * c), min(hi, (i + 1) * c)
                src.append(slice(a - i * c, b - i * c))
                dst.append(slice(a - lo, b - lo))
            chunk = self._chunk(index)
            out[tuple(dst)] = self.fill_value if chunk is None else chunk[tuple(src)]
        return out
