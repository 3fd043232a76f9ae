"""Which inputs a store already holds, whatever folder they are ingested from.

An image's identity is the content of the files it was read from, not its name: names come from file
and folder names, which collide across roots (``siteA/x.nii.gz``, ``siteB/x.nii.gz``) and move with
them. Ingest records :func:`source_digest` in every manifest entry (``ImageMeta.content_hash``, beside
the recorded ``source`` path), so that ingesting the same file again from any root is a no-op, and a
different file whose name is already taken gets a fresh name (:func:`free_name`) instead of replacing
the stored image. Entries of stores written before content hashes keep the old rule: a source whose
name is listed is taken as present.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Mapping

DIGEST = "sha256"


def file_digest(path: str, block: int = 1 << 20) -> str:
    """Hex SHA-256 of the bytes of file ``path`` (read once; the reader then finds it in the page cache)."""
    digest = hashlib.new(DIGEST)
    with open(path, "rb") as f:
        while data := f.read(block):
            digest.update(data)
    return digest.hexdigest()


def source_digest(paths: Iterable[str]) -> str:
    """``"sha256:<hex>"`` identifying the content of a source's files, independent of where they lie
    and in which order they are listed (a DICOM series, a case folder): the digest of the sorted digests
    of its files (a single file: its own digest)."""
    digests = sorted(file_digest(p) for p in paths)
    if len(digests) == 1:
        return f"{DIGEST}:{digests[0]}"
    return f"{DIGEST}:{hashlib.sha256(' '.join(digests).encode()).hexdigest()}"


def free_name(name: str, taken: Callable[[str], bool]) -> str:
    """``name``, or ``name_2``, ``name_3``, ... : the first for which ``taken`` is false."""
    candidate, k = name, 1
    while taken(candidate):
        k += 1
        candidate = f"{name}_{k}"
    return candidate


def known_digests(hashes: Iterable[str]) -> dict[str, int]:
    """``{digest: number of images}`` over the recorded ``hashes`` (``""``: recorded before digests)."""
    counts: dict[str, int] = {}
    for digest in hashes:
        if digest:
            counts[digest] = counts.get(digest, 0) + 1
    return counts


def legacy_names(hashes: Mapping[str, str]) -> frozenset[str]:
    """The names of ``{name: content hash}`` recorded without a digest (identified by name only)."""
    return frozenset(name for name, digest in hashes.items() if not digest)
