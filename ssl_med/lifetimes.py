"""Process lifetimes: worker processes die with their parent, and SIGINT / SIGTERM stop a command cleanly.

Worker processes (ingest's process pool, the training DataLoader's workers) run
:func:`init_worker` first. It asks Linux to kill the worker when its parent dies
(``prctl(PR_SET_PDEATHSIG, SIGKILL)``, a no-op elsewhere), so a parent killed with ``kill -9`` leaves
no orphans computing into the void, and it makes the worker ignore SIGINT and SIGTERM: Ctrl+C reaches
the whole foreground process group and SLURM signals every process of a job, and a worker that died of
them would turn a clean stop into "DataLoader worker exited unexpectedly". The parent decides when to
stop and takes its workers down with it (:func:`stop_workers`).

The parent runs its work inside :class:`StopSignals`: the first SIGINT or SIGTERM is only recorded, and
the work stops at its next safe point (after a training step, between ingest sources) with
:class:`Interrupted`, which commands report in one line with exit code ``128 + signal`` (130, 143). A
second SIGINT raises ``KeyboardInterrupt`` at once, for the impatient.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import multiprocessing.process
import os
import signal
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from types import FrameType, TracebackType
from typing import Any

log = logging.getLogger(__name__)

#: ``prctl`` option: the signal this process gets when its parent thread exits (``<linux/prctl.h>``)
PR_SET_PDEATHSIG = 1
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
#: the signal by which a parent asks its workers to abandon their tasks (none on Windows)
ABANDON: signal.Signals | None = getattr(signal, "SIGUSR2", None)


def die_with_parent(parent_pid: int | None = None) -> bool:
    """Have the kernel SIGKILL this process when its parent exits (strictly: the parent's thread that
    started it, here always the main thread); ``True`` where that is possible (Linux).

    ``parent_pid`` closes the race of a parent that died before this call: if this process has already
    been handed to another parent, it exits at once.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(1)
    return True


def init_worker(parent_pid: int | None = None, *_: Any) -> None:
    """Initialiser of every worker process: dies with ``parent_pid``, ignores SIGINT and SIGTERM (the
    parent stops it), and abandons its task on :data:`ABANDON` (:func:`stop_workers`). Extra arguments
    are ignored (a DataLoader passes the worker id)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    if ABANDON is not None:
        signal.signal(ABANDON, _abandon)
    die_with_parent(parent_pid)


_TASKS_RUNNING = 0


@contextlib.contextmanager
def abandonable() -> Iterator[None]:
    """Marks a worker's task that :data:`ABANDON` may end (with ``SystemExit``). Outside such a task
    the signal is ignored: an idle pool worker is waiting for its next task or for the parent's
    shutdown sentinel, and must not be torn out of that exchange."""
    global _TASKS_RUNNING
    _TASKS_RUNNING += 1
    try:
        yield
    finally:
        _TASKS_RUNNING -= 1


def _abandon(signum: int, frame: FrameType | None) -> None:
    if _TASKS_RUNNING:
        raise SystemExit(128 + signum)


def stop_workers(workers: Iterable[multiprocessing.process.BaseProcess], grace: float = 5.0) -> None:
    """Ask ``workers`` to abandon their :func:`abandonable` tasks (:data:`ABANDON`: ``SystemExit`` in the
    task, after which a pool worker takes its shutdown sentinel and exits normally, running its
    clean-up), and kill those still alive after ``grace`` seconds (a task deep in a C call)."""
    workers = [w for w in workers if w.is_alive()]
    for worker in workers:
        if ABANDON is not None and worker.pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, ABANDON)
    deadline = time.monotonic() + (grace if ABANDON is not None else 0.0)
    for worker in workers:
        worker.join(max(0.0, deadline - time.monotonic()))
        if worker.is_alive():
            worker.kill()


class Interrupted(Exception):
    """Work stopped by a signal at a safe point; ``str()`` is the one-line report, ``exit_code`` is
    ``128 + signal`` as a shell reports a process ended by that signal."""

    def __init__(self, signum: int, message: str) -> None:
        super().__init__(message)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum)


class AbandonTask(BaseException):
    """Raised by :class:`StopSignals` out of the work inside :meth:`StopSignals.abandoning` (a
    ``BaseException``, so that code catching ``Exception`` around a bad input does not swallow it)."""


class StopSignals:
    """Within the block, SIGINT and SIGTERM are recorded in :attr:`received` (the first one), not acted
    on; the work polls it. Previous handlers come back on exit. Outside the main thread it does nothing
    (signals are only delivered there).

    Handlers installed later inside the block may chain to these (Lightning's SIGTERM handler calls
    an existing one, so its SLURM requeue handling keeps working alongside).
    """

    def __init__(self, what: str = "work") -> None:
        self.what = what
        self.received: int | None = None
        self._previous: dict[int, Any] = {}
        self._abandon = False

    @contextlib.contextmanager
    def abandoning(self) -> Iterator[None]:
        """Within, the first signal also ends the work in progress: :class:`AbandonTask` is raised out
        of it and caught here (for work in this process that may take long, e.g. ``ingest --workers 1``
        reading one large source, and whose partial results are not kept)."""
        self._abandon = self.received is None
        try:
            yield
        except AbandonTask:
            pass
        finally:
            self._abandon = False

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if self.received is not None:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.received = signum
        log.warning("%s received: stopping the %s at its next safe point%s", signal.Signals(signum).name,
                    self.what, " (Ctrl+C again stops at once)" if signum == signal.SIGINT else "")  # fmt: skip
        if self._abandon:
            self._abandon = False
            raise AbandonTask

    @property
    def signal_name(self) -> str:
        return "" if self.received is None else signal.Signals(self.received).name
