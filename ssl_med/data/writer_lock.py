"""One writer per store: ``ssl_med ingest`` and ``repair`` hold an exclusive lock while they write.

Two ingests into one store at once (two benchmark seeds started together, a re-run while the first is
still going) would otherwise race: one deletes or rewrites a chunk the other is writing, and the loser
reports its source as unreadable although the file is fine. The lock is an advisory ``flock`` on
``<store>/.writer.lock``; the operating system drops it when its holder exits, however it exits, so a
crashed ingest never leaves the store locked (the file stays, empty of meaning, and is reused). A second
writer logs who holds the lock (pid, command, start time, written into the file) and waits for it; the
work it finds done is then counted as "already in the store". Readers (pretraining, evaluation) never
take the lock. Stores on object storage (``s3://``, ``memory://``) have no such lock: one writer at a
time there is the caller's job; nor do file systems without ``flock`` (e.g. Lustre mounted without it),
where a warning says so and the writer goes on unserialised. A lock file another user created (a group's
shared store) is opened read-only: the lock still works, only the holder's description is not written.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

try:
    import fcntl
except ImportError:  # Windows: no flock; writers are not serialised there
    fcntl = None  # type: ignore[assignment]

LOCK_NAME = ".writer.lock"
log = logging.getLogger(__name__)


def lock_path(store: str | os.PathLike[str]) -> Path | None:
    """The lock file of a local store (``None`` for a URL other than ``file://``)."""
    store = os.fspath(store)
    if "://" in store and not store.startswith("file://"):
        return None
    return Path(store.removeprefix("file://")) / LOCK_NAME


@contextmanager
def exclusive_writer(store: str | os.PathLike[str]) -> Iterator[None]:
    """Hold the store's writer lock for the body; wait while another process holds it, with a warning
    (``ssl_med.data.writer_lock`` logger) naming the holder: pid, command, start time.

    Args:
        store: local path or URL of the store (created as a folder if missing, as writing would).
    """
    path = lock_path(store)
    if path is None or fcntl is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with _open_lock_file(path) as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            log.warning("waiting for the writer of %s to finish (%s; lock %s)", os.fspath(store), holder, path)
            fcntl.flock(handle, fcntl.LOCK_EX)
        except OSError as err:  # no flock on this file system
            log.warning("cannot lock %s (%s): writers of this store are not serialised", path, err)
            yield
            return
        try:
            if handle.writable():
                handle.seek(0)
                handle.truncate()
                handle.write(f"pid {os.getpid()}, {' '.join(sys.argv) or 'python'}, since {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
                handle.flush()
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _open_lock_file(path: Path) -> IO[str]:
    """The lock file, for writing the holder's description; read-only where another user created it (a group's
    shared store): ``flock`` works on a read-only handle too."""
    try:
        return open(path, "a+")
    except PermissionError:
        return open(path)
