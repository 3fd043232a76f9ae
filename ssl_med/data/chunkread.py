"""The ``direct`` read engine: regions of a local zarr v3 array decoded straight from its chunk files.

zarr-python routes every read through its asyncio codec pipeline, which costs milliseconds of
Python overhead per crop; a 96³ crop touches only 8-27 chunks, so for local stores reading those
files and Blosc-decoding them in a plain loop is several times faster (measured in
``docs/benchmarks/data.md``). Only the simple layout ssl_med writes is handled: a regular chunk grid,
``bytes`` (+ ``blosc`` or ``zstd``) (+ ``crc32c``) codecs, no sharding or transposes. Anything else
returns ``None`` from :meth:`ChunkReader.open` and callers fall back to zarr-python.

Every chunk is checked before it is decoded: its length against what its encoding promises and its
CRC-32C, and an absent chunk file against the array's inventory of written chunks
(:mod:`ssl_med.data.integrity`); a bad chunk raises :class:`~ssl_med.data.integrity.ChunkError`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from numcodecs import Blosc, Zstd

from ssl_med.data.integrity import INVENTORY_ATTR, ChunkError, ChunkInventory, blocks, check_chunk_bytes

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
        self.checksummed = codecs[-1]["name"] == "crc32c"
        compressors = [c["name"] for c in codecs[1:] if c["name"] != "crc32c"]
        self.compressor = compressors[0] if compressors else None
        self.decoder = _DECODERS[self.compressor]() if self.compressor else None
        self.nbytes = int(np.prod(self.chunks)) * self.dtype.itemsize
        #: chunks that were written (``None``: a store from before inventories, absent = fill)
        self.inventory = ChunkInventory.from_attr(meta.get("attributes", {}).get(INVENTORY_ATTR))
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
            or not _supported_chain([c["name"] for c in codecs[1:]])
            or meta.get("chunk_key_encoding", {}).get("name") not in ("default", "v2")
            or not isinstance(meta.get("data_type"), str)
        ):
            return None
        try:
            np.dtype(meta["data_type"])
        except TypeError:
            return None
        return cls(Path(path), meta)

    def key(self, index: Sequence[int]) -> str:
        """The store key of chunk ``index`` (e.g. ``c/0/1/0/2``)."""
        return self.prefix + self.separator.join(str(i) for i in index)

    def _chunk(self, index: Sequence[int]) -> np.ndarray | None:
        """Chunk ``index`` decoded, ``None`` when it is all fill value (never written)."""
        key = self.key(index)
        try:
            with open(os.path.join(self.path, *key.split("/")), "rb") as f:
                raw = f.read()
        except FileNotFoundError:
            if self.inventory is None or not self.inventory.expects(index):
                return None  # zarr skipped it: all fill value
            raise self._error("missing", key, "the store's inventory lists it as written") from None
        problem = check_chunk_bytes(
            raw, checksummed=self.checksummed, compressor=self.compressor, nbytes=self.nbytes
        )
        if problem is not None:
            raise self._error(problem[0], key, problem[1])
        payload = memoryview(raw)[:-4] if self.checksummed else raw  # no copy of the chunk
        try:
            data = self.decoder.decode(payload) if self.decoder is not None else payload
            return np.frombuffer(data, dtype=self.dtype).reshape(self.chunks)
        except Exception as exc:  # a chunk without a checksum (older stores) that does not decode
            raise self._error("corrupted", key, f"{type(exc).__name__}: {exc}") from exc

    def _error(self, kind: str, key: str, detail: str) -> ChunkError:
        return ChunkError(detail, kind=kind, key=key, array=self.path)

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
        for index, src, dst in blocks(bounds, self.chunks):
            chunk = self._chunk(index)
            out[dst] = self.fill_value if chunk is None else chunk[src]
        return out


def _supported_chain(names: list[str]) -> bool:
    """``[compressor]`` then ``[crc32c]``, each optional, the compressor one the reader decodes."""
    if names and names[-1] == "crc32c":
        names = names[:-1]
    return len(names) <= 1 and all(n in _DECODERS for n in names)
