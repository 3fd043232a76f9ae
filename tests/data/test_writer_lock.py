"""One writer per store: concurrent ingests wait for each other instead of racing on chunks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

from ssl_med.data.ingest import IngestReport, ingest
from ssl_med.data.store import ImageStore
from ssl_med.data.verify import verify
from ssl_med.data.writer_lock import exclusive_writer, lock_path


def _wait_for(condition, seconds: float = 60.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def _waits(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "ssl_med.data.writer_lock" and r.levelname == "WARNING"]


def test_two_ingests_into_one_store_at_once_both_finish_and_every_image_is_written_once(inputs, tmp_path, caplog) -> None:
    out = str(tmp_path / "s.zarr")
    reports: list[IngestReport] = []
    barrier = threading.Barrier(2)

    def run() -> None:
        barrier.wait()
        reports.append(ingest([str(inputs["good"])], out, progress=False))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    assert len(reports) == 2 and not any(r.skipped for r in reports), [r.skipped for r in reports]
    assert sorted(r.written for r in reports) == [0, 8] and sorted(r.present for r in reports) == [0, 8]
    assert len(_waits(caplog)) <= 1  # 0 if the first finished before the second began
    assert len(ImageStore(out)) == 8 and verify(out).ok


def test_an_ingest_waits_while_the_store_is_held_and_says_by_whom(inputs, tmp_path, caplog) -> None:
    out = tmp_path / "held.zarr"  # a Path works as well as a str
    reports: list[IngestReport] = []
    worker = threading.Thread(target=lambda: reports.append(ingest([str(inputs["good"])], out, progress=False)))
    with exclusive_writer(out):
        worker.start()
        assert _wait_for(lambda: _waits(caplog))
        message = _waits(caplog)[0]
        assert message.startswith(f"waiting for the writer of {out}") and f"pid {os.getpid()}" in message
        time.sleep(0.5)
        assert worker.is_alive() and not reports and not (Path(out) / "zarr.json").exists()
    worker.join(timeout=300)
    assert reports and reports[0].written == 8 and len(ImageStore(out)) == 8


def test_the_lock_of_a_killed_writer_is_free_at_once(tmp_path, caplog) -> None:
    out = str(tmp_path / "crash.zarr")
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from ssl_med.data.writer_lock import exclusive_writer\nimport time\n"
         f"with exclusive_writer({out!r}):\n    print('held', flush=True)\n    time.sleep(600)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        def wait_for_the_lock() -> None:
            with exclusive_writer(out):
                pass

        waiter = threading.Thread(target=wait_for_the_lock, daemon=True)
        waiter.start()
        assert _wait_for(lambda: _waits(caplog)) and f"pid {holder.pid}" in _waits(caplog)[0]
        holder.send_signal(signal.SIGKILL)
        waiter.join(timeout=30)
        assert not waiter.is_alive()  # the killed process's lock went with it
    finally:
        holder.kill()
        holder.wait()


def test_without_flock_the_writer_goes_on_with_a_warning(tmp_path, caplog, monkeypatch) -> None:
    import ssl_med.data.writer_lock as writer_lock

    def no_flock(handle, operation) -> None:
        raise OSError(37, "No locks available")

    monkeypatch.setattr(writer_lock.fcntl, "flock", no_flock)
    ran = []
    with exclusive_writer(tmp_path / "s.zarr"):
        ran.append(True)
    assert ran and "writers of this store are not serialised" in _waits(caplog)[0]


def test_only_local_stores_have_a_lock_file() -> None:
    assert lock_path("s3://bucket/s.zarr") is None and lock_path("memory://s.zarr") is None
    assert lock_path("file:///data/s.zarr") == Path("/data/s.zarr/.writer.lock")
    assert lock_path("s.zarr") == Path("s.zarr/.writer.lock")
