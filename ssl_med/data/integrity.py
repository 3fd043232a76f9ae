"""Chunk integrity: checksums, the inventory of written chunks, and errors that name the chunk.

Every array ssl_med writes ends its codec chain with zarr v3's ``crc32c`` codec (see
:meth:`~ssl_med.data.layout.Layout.compressors`), so each stored chunk carries a CRC-32C of its
encoded bytes, and records in its attributes (:data:`INVENTORY_ATTR`) which chunks were written.
zarr skips chunks that are entirely the fill value, so an absent chunk file is either such a chunk
(read as the fill value) or a lost one: the inventory tells them apart. Both read engines enforce
it: the ``direct`` reader (:mod:`ssl_med.data.chunkread`) checks each chunk's size and checksum
before decoding it, and :func:`read_zarr` checks zarr-python's result. A missing, truncated or
corrupted chunk raises :class:`ChunkError`, which names the chunk (and, from
:meth:`ImageStore.read <ssl_med.data.store.ImageStore.read>`, the image); never zeros.

Stores written before inventories existed are still read, with one warning per store that lost
chunks would read as the fill value there (re-ingest to make them verifiable).
"""

from __future__ import annotations

import base64
import itertools
import math
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import google_crc32c
import numpy as np
import zarr

#: array attribute holding the :class:`ChunkInventory`
INVENTORY_ATTR = "ssl_med_chunks"

Block = tuple[tuple[int, ...], tuple[slice, ...], tuple[slice, ...]]


class ChunkError(RuntimeError):
    """A chunk of a store array is ``missing``, ``truncated`` or ``corrupted``.

    ``str()`` names the image (when known), the chunk key, the array and the store. Constructible
    from a message alone, so that the type survives a DataLoader worker's re-raise.
    """

    def __init__(
        self, detail: str = "", *, kind: str = "", key: str = "", array: str = "", store: str = ""
    ) -> None:
        super().__init__(detail)
        self.detail, self.kind, self.key, self.array, self.store = detail, kind, key, array, store
        self.image = ""

    def __str__(self) -> str:
        if not self.key:
            return self.detail
        head = f"image {self.image!r}: " if self.image else ""
        where = f"{self.array} in {self.store}" if self.store else self.array
        tail = f" ({self.detail})" if self.detail else ""
        return f"{head}chunk {self.key} of {where} is {self.kind}{tail}"

    def naming(self, image: str) -> ChunkError:
        """This error, naming ``image`` (the first name given wins: a label map names its image)."""
        self.image = self.image or image
        return self


class UnverifiableStoreWarning(UserWarning):
    """The store has no chunk inventory or no checksums: lost or altered chunks cannot be detected."""


_WARNED: set[str] = set()


def warn_unverifiable(store: str, reason: str) -> None:
    """Warn once per process and store that ``store`` cannot be verified, and why."""
    if store in _WARNED:
        return
    _WARNED.add(store)
    warnings.warn(
        f"image store {store} {reason}: a lost chunk reads as the fill value and a changed one goes "
        "unnoticed; re-ingest it to add chunk inventories and checksums",
        UnverifiableStoreWarning,
        stacklevel=3,
    )


@dataclass(frozen=True)
class ChunkInventory:
    """Which chunks (storage keys: shards for sharded arrays) of an array were written.

    Attributes:
        grid: number of chunks along each axis.
        written: boolean array of shape ``grid``.
    """

    grid: tuple[int, ...]
    written: np.ndarray

    @property
    def count(self) -> int:
        return int(self.written.sum())

    def expects(self, index: Sequence[int]) -> bool:
        """Whether chunk ``index`` was written (so must exist)."""
        return bool(self.written[tuple(index)])

    def to_attr(self) -> dict[str, Any]:
        """JSON form: grid, count, and the row-major bitmap packed and base64-encoded."""
        bitmap = base64.b64encode(np.packbits(self.written.reshape(-1)).tobytes()).decode()
        return {"grid": list(self.grid), "count": self.count, "bitmap": bitmap}

    @classmethod
    def from_attr(cls, attr: Any) -> ChunkInventory | None:
        """The inventory in an array's attributes, ``None`` when there is none (older stores)."""
        if not attr:
            return None
        grid = tuple(int(g) for g in attr["grid"])
        bits = np.unpackbits(np.frombuffer(base64.b64decode(attr["bitmap"]), dtype=np.uint8))
        written = bits[: math.prod(grid)].astype(bool).reshape(grid)
        if int(written.sum()) != int(attr["count"]):
            raise ValueError(
                f"chunk inventory damaged: bitmap lists {written.sum()} chunks, count says {attr['count']}"
            )
        return cls(grid, written)

    @classmethod
    def of(cls, array: zarr.Array) -> ChunkInventory | None:
        return cls.from_attr(array.attrs.get(INVENTORY_ATTR))


def storage_chunks(array: zarr.Array) -> tuple[int, ...]:
    """Shape of the array's storage keys: its shards when sharded, else its chunks."""
    return tuple(array.metadata.chunk_grid.chunk_shape)


def _sync(coroutine: Any) -> Any:
    from zarr.core.sync import sync

    return sync(coroutine)


def _prefix(array: zarr.Array) -> str:
    return f"{array.store_path.path}/" if array.store_path.path else ""


def record_inventory(array: zarr.Array) -> ChunkInventory:
    """List the chunks ``array`` has in its store and record them in its attributes (call after writing)."""
    store, prefix = array.store_path.store, _prefix(array)

    async def listing() -> set[str]:
        return {key[len(prefix) :] async for key in store.list_prefix(prefix)}

    stored = _sync(listing())
    grid = tuple(math.ceil(s / c) for s, c in zip(array.shape, storage_chunks(array)))
    written = np.zeros(grid, dtype=bool)
    for index in itertools.product(*(range(g) for g in grid)):
        written[index] = array.metadata.encode_chunk_key(index) in stored
    inventory = ChunkInventory(grid, written)
    array.attrs[INVENTORY_ATTR] = inventory.to_attr()
    return inventory


def blocks(bounds: Sequence[tuple[int, int]], chunks: Sequence[int]) -> Iterator[Block]:
    """The chunks a region ``[(lo, hi), ...]`` touches: ``(chunk index, slices in the chunk, slices in the region)``."""
    grid = [range(lo // c, (hi - 1) // c + 1) for (lo, hi), c in zip(bounds, chunks)]
    for index in itertools.product(*grid):
        src, dst = [], []
        for i, (lo, hi), c in zip(index, bounds, chunks):
            a, b = max(lo, i * c), min(hi, (i + 1) * c)
            src.append(slice(a - i * c, b - i * c))
            dst.append(slice(a - lo, b - lo))
        yield index, tuple(src), tuple(dst)


def check_chunk_bytes(
    raw: bytes, *, checksummed: bool, compressor: str | None, nbytes: int
) -> tuple[str, str] | None:
    """Why the encoded chunk ``raw`` is bad, as ``(kind, detail)``, or ``None`` when it checks out.

    Truncation is told apart from corruption by the length the encoding promises (Blosc's header
    records its compressed size; uncompressed chunks are ``nbytes`` long); with ``checksummed`` the
    last 4 bytes are the CRC-32C of the rest (zarr's ``crc32c`` codec).
    """
    tail = 4 if checksummed else 0
    if len(raw) <= tail:
        return "truncated", f"{len(raw)} bytes"
    expected = None
    if compressor == "blosc" and len(raw) >= 16 + tail:
        expected = int.from_bytes(raw[12:16], "little") + tail  # Blosc header: total compressed size
    elif compressor is None:
        expected = nbytes + tail
    if expected is not None and len(raw) != expected:
        kind = "truncated" if len(raw) < expected else "corrupted"
        return kind, f"{len(raw)} bytes, its encoding says {expected}"
    if checksummed:
        payload = np.frombuffer(raw, dtype=np.uint8)
        if google_crc32c.value(payload[:-4]) != int.from_bytes(raw[-4:], "little"):
            return "corrupted", "CRC-32C checksum mismatch"
    return None


def _is_fill(block: np.ndarray, fill: Any) -> bool:
    if isinstance(fill, (float, np.floating)) and np.isnan(fill):
        return bool(np.isnan(block).all())
    return bool((block == fill).all())


def read_zarr(array: zarr.Array, selection: tuple[slice, ...], path: str, store: str) -> np.ndarray:
    """``array[selection]`` through zarr-python, raising :class:`ChunkError` where the ``direct`` reader
    would: a chunk that fails to decode, or one the inventory lists that is absent (zarr would fill it)."""
    bounds = [s.indices(n)[:2] for s, n in zip(selection, array.shape)]
    chunks = storage_chunks(array)
    try:
        out = np.asarray(array[selection])
    except Exception as exc:
        raise _locate_fault(array, bounds, path, store, exc) from exc
    inventory = ChunkInventory.of(array)
    if inventory is None:
        warn_unverifiable(store, "has no chunk inventory")
        return out
    if out.size == 0:
        return out
    fill, prefix = array.fill_value, _prefix(array)
    for index, _, dst in blocks(bounds, chunks):
        if inventory.expects(index) and _is_fill(out[dst], fill):  # all fill: written, or lost?
            key = array.metadata.encode_chunk_key(index)
            if not _sync(array.store_path.store.exists(prefix + key)):
                raise ChunkError("the store's inventory lists it as written", kind="missing", key=key,
                                 array=path, store=store)  # fmt: skip
    return out


def _locate_fault(
    array: zarr.Array, bounds: Sequence[tuple[int, int]], path: str, store: str, exc: Exception
) -> Exception:
    """The :class:`ChunkError` for the first chunk of ``bounds`` that zarr-python cannot read (or ``exc``)."""
    for index, _, _ in blocks(bounds, storage_chunks(array)):
        region = tuple(
            slice(max(lo, i * c), min(hi, (i + 1) * c))
            for i, (lo, hi), c in zip(index, bounds, storage_chunks(array))
        )
        try:
            array[region]
        except Exception as inner:
            return ChunkError(f"{type(inner).__name__}: {inner}", kind=_fault_kind(array, index),
                              key=array.metadata.encode_chunk_key(index), array=path, store=store)  # fmt: skip
    return exc


def _fault_kind(array: zarr.Array, index: tuple[int, ...]) -> str:
    """``truncated`` or ``corrupted`` for an unsharded chunk that failed to decode (``corrupted`` if unsure)."""
    from zarr.core.buffer import default_buffer_prototype

    codecs = [c["name"] for c in array.metadata.to_dict()["codecs"]]
    if "sharding_indexed" in codecs:
        return "corrupted"
    key = _prefix(array) + array.metadata.encode_chunk_key(index)
    buffer = _sync(array.store_path.store.get(key, prototype=default_buffer_prototype()))
    if buffer is None:
        return "missing"
    compressor = next((c for c in codecs[1:] if c != "crc32c"), None)
    nbytes = math.prod(storage_chunks(array)) * array.dtype.itemsize
    problem = check_chunk_bytes(
        buffer.to_bytes(), checksummed=codecs[-1] == "crc32c", compressor=compressor, nbytes=nbytes
    )
    return problem[0] if problem else "corrupted"
