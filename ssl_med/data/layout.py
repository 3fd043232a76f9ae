"""On-disk layout of store arrays: chunk shape, optional shards and the Blosc codec.

The defaults come from ``scripts/bench_data.py`` (see ``docs/benchmarks/data.md``): for random 96³
crops the read cost is dominated by decompressing the chunks a crop touches, so chunks are small
enough that a crop over-reads little (64³ int16 = 512 KiB, ~1 MB as zarr recommends) and the codec
is Blosc-LZ4 with byte shuffle, which decodes several times faster than zstd+bitshuffle at a
slightly lower compression ratio. 2D images use 256² tiles (whole image when smaller). Every chunk
ends with a CRC-32C of its bytes (zarr's ``crc32c`` codec; checking it costs a few percent of a
crop's read time, see :mod:`ssl_med.data.integrity`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from zarr.codecs import BloscCodec, Crc32cCodec


@dataclass(frozen=True)
class Layout:
    """How one array is chunked and compressed.

    Attributes:
        chunk_3d: chunk edge (voxels) for volumes; chunks are ``(1, e, e, e)`` (one channel each).
        chunk_2d: chunk edge (pixels) for 2D images; chunks are ``(1, e, e)``.
        shard_3d: shard edge for volumes (a multiple of ``chunk_3d``), or ``None`` for no sharding.
            Shards cut the number of files/objects (object stores, inode limits); the ``direct``
            read engine does not read sharded arrays, zarr-python does.
        cname, clevel, shuffle: the Blosc codec (``shuffle`` is ``"shuffle"``, ``"bitshuffle"`` or
            ``"noshuffle"``).
        stack_chunk_bytes: target uncompressed chunk size for stacks of small images (MedMNIST).
        checksums: end every chunk with a CRC-32C (zarr's ``crc32c`` codec).
    """

    chunk_3d: int = 64
    chunk_2d: int = 256
    shard_3d: int | None = None
    cname: str = "lz4"
    clevel: int = 5
    shuffle: str = "shuffle"
    stack_chunk_bytes: int = 1 << 20
    checksums: bool = True

    def chunks(self, shape: Sequence[int]) -> tuple[int, ...]:
        """Chunk shape for an image ``(C, *spatial)``."""
        side = self.chunk_3d if len(shape) == 4 else self.chunk_2d
        return (1, *(min(int(s), side) for s in shape[1:]))

    def shards(self, shape: Sequence[int]) -> tuple[int, ...] | None:
        """Shard shape for an image ``(C, *spatial)`` (volumes only), or ``None``."""
        if self.shard_3d is None or len(shape) != 4:
            return None
        if self.shard_3d % self.chunk_3d:
            raise ValueError(
                f"shard edge {self.shard_3d} is not a multiple of the chunk edge {self.chunk_3d}"
            )
        chunks = self.chunks(shape)
        # a shard must be a whole number of chunks: round each axis up to a chunk multiple
        return (1, *(min(self.shard_3d, math.ceil(s / c) * c) for s, c in zip(shape[1:], chunks[1:])))

    def stack_chunks(self, shape: Sequence[int], itemsize: int) -> tuple[int, ...]:
        """Chunks for a stack ``(N, C, *spatial)`` of small images: whole images, ~1 MiB per chunk."""
        per_image = math.prod(shape[1:]) * itemsize
        n = max(1, min(int(shape[0]), self.stack_chunk_bytes // max(per_image, 1)))
        return (n, *(int(s) for s in shape[1:]))

    def codec(self) -> BloscCodec:
        return BloscCodec(cname=self.cname, clevel=self.clevel, shuffle=self.shuffle)

    def compressors(self) -> tuple[BloscCodec | Crc32cCodec, ...]:
        """The bytes-to-bytes codecs of a chunk: Blosc, then the checksum."""
        return (self.codec(), Crc32cCodec()) if self.checksums else (self.codec(),)


DEFAULT_LAYOUT = Layout()
