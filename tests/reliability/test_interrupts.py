"""Runs that are killed or signalled: a kill inside a checkpoint save, SIGTERM and SIGINT during
pretraining, SIGINT and ``kill -9`` of a parallel ingest."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from ssl_med.cli import main as cli
from ssl_med.data.ingest import ingest
from ssl_med.data.store import ImageStore
from ssl_med.data.verify import verify
from ssl_med.train.checkpoints import checkpoint_problem

#: makes ``torch.save`` of the step-4 ``last.ckpt`` write half its bytes and end the process at once
DIE_INSIDE_THE_SAVE = """
import io, os, torch
_save = torch.save
def _dying_save(obj, f, *args, **kwargs):
    if ".last.ckpt.tmp" in str(getattr(f, "name", f)) and obj.get("global_step") == 4:
        buffer = io.BytesIO()
        _save(obj, buffer, *args, **kwargs)
        f.write(buffer.getvalue()[: buffer.tell() // 2])
        f.flush()
        os._exit(137)
    return _save(obj, f, *args, **kwargs)
torch.save = _dying_save
"""


def global_step(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=True)["global_step"])


def test_kill_inside_a_checkpoint_save_keeps_the_previous_one(processes, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = processes.pretrain_args(run, "trainer.max_steps=6", "trainer.checkpoint_every_n_steps=2")
    proc = processes.spawn(args, prelude=DIE_INSIDE_THE_SAVE)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 137, out
    last = run / "checkpoints" / "last.ckpt"
    partial = list(last.parent.glob(".last.ckpt.tmp*"))
    assert len(partial) == 1 and checkpoint_problem(partial[0])  # the kill came mid-write
    assert checkpoint_problem(last) is None and global_step(last) == 2  # the previous one, intact

    assert cli(args) == 0  # resumes from it, and the partial file is cleared away
    assert f"resuming from {last}" in (run / "pretrain.log").read_text()
    assert global_step(last) == 6 and not list(last.parent.glob(".last.ckpt.tmp*"))


# -- helpers -----------------------------------------------------------------------------------------
def children(pid: int) -> set[int]:
    """The live child processes of ``pid`` (Linux ``/proc``)."""
    found: set[int] = set()
    for task in Path(f"/proc/{pid}/task").glob("*"):
        with contextlib.suppress(OSError):
            found |= {int(c) for c in (task / "children").read_text().split()}
    return found


def spawned_workers(pid: int) -> set[int]:
    """The children of ``pid`` started by multiprocessing's ``spawn`` (not its resource tracker)."""
    found = set()
    for child in children(pid):
        with contextlib.suppress(OSError):
            if "spawn_main" in Path(f"/proc/{child}/cmdline").read_text():
                found.add(child)
    return found


def images_written(store: Path) -> int:
    """Images whose arrays are complete in ``store`` (a worker writes their metadata last)."""
    count = 0
    for metadata in store.glob("images/*/zarr.json"):
        with contextlib.suppress(OSError, ValueError):  # being written
            count += "ssl_med" in json.loads(metadata.read_text()).get("attributes", {})
    return count


def alive(pid: int) -> bool:
    """``pid`` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_for(condition, timeout: float, what: str, proc: subprocess.Popen[str] | None = None) -> None:
    """Poll ``condition()`` every 50 ms; fail naming ``what`` (with ``proc``'s output) after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"process ended before {what}:\n{proc.communicate()[0]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def fifo_inputs(folder: Path, blocked: int, good: int = 0) -> Path:
    """``good`` small ``.npy`` images and ``blocked`` FIFOs named ``*.npy``: a worker that opens a FIFO
    waits for a writer that never comes, so it is busy for as long as the test wants."""
    folder.mkdir()
    for i in range(good):
        np.save(folder / f"good{i}.npy", np.random.default_rng(i).random((8, 8), dtype=np.float32))
    for i in range(blocked):
        os.mkfifo(folder / f"blocked{i}.npy")
    return folder


needs_proc = pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="needs Linux /proc")


# -- pretraining: SIGTERM and SIGINT -------------------------------------------------------------------
@needs_proc
def test_sigterm_saves_last_checkpoint_and_stops_with_its_workers(processes, tmp_path: Path) -> None:
    run = tmp_path / "run"
    args = processes.pretrain_args(run, "trainer.max_steps=100000", "trainer.checkpoint_every_n_steps=2",
                                   "data.num_workers=1")  # fmt: skip
    proc = processes.spawn(args)
    wait_for(lambda: (run / "checkpoints" / "last.ckpt").exists(), 120, "the first checkpoint", proc)
    assert len(spawned_workers(proc.pid)) == 1  # the data worker
    workers = children(proc.pid)  # and multiprocessing's resource tracker
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=30)
    assert time.monotonic() - sent < 10, "took too long to stop"
    assert proc.returncode == 128 + signal.SIGTERM, out
    assert "Traceback" not in out
    message = out.strip().splitlines()[-1]
    last = run / "checkpoints" / "last.ckpt"
    step = global_step(last)
    assert message == (f"ssl_med pretrain: stopped by SIGTERM after step {step}; saved {last}; "
                       "run the same command again to resume")  # fmt: skip
    wait_for(lambda: not any(alive(pid) for pid in workers), 10, "the data workers to exit")

    # an even number of steps: Lightning saves no final last.ckpt once it saved one at a
    # checkpoint_every_n_steps boundary, so the run ends on one
    target = step + 2 + step % 2
    overrides = [a for a in args if not a.startswith(("trainer.max_steps", "data.num_workers"))]
    assert cli([*overrides, f"trainer.max_steps={target}", "data.num_workers=0"]) == 0
    assert f"resuming from {last}" in (run / "pretrain.log").read_text()
    assert global_step(last) == target


def test_sigint_saves_last_checkpoint_and_stops(processes, tmp_path: Path, capsys) -> None:
    """In this process: the first Ctrl+C is recorded, the run stops after its step with last.ckpt."""
    run = tmp_path / "run"
    last = run / "checkpoints" / "last.ckpt"

    def interrupt_after_the_first_checkpoint() -> None:
        deadline = time.monotonic() + 120
        while not last.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(os.getpid(), signal.SIGINT)

    before = signal.getsignal(signal.SIGINT)  # default_int_handler; SIG_IGN under `nohup ... &`
    threading.Thread(target=interrupt_after_the_first_checkpoint, daemon=True).start()
    code = cli(processes.pretrain_args(run, "trainer.max_steps=100000", "trainer.checkpoint_every_n_steps=2"))
    assert code == 128 + signal.SIGINT
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("ssl_med pretrain: stopped by SIGINT after step ") and f"saved {last}" in err
    assert checkpoint_problem(last) is None and global_step(last) >= 2
    assert signal.getsignal(signal.SIGINT) is before  # the caller's handler restored


# -- ingest: kill -9 and SIGINT ------------------------------------------------------------------------
@needs_proc
def test_kill_9_of_ingest_leaves_no_orphan_workers(processes, tmp_path: Path) -> None:
    inputs = fifo_inputs(tmp_path / "in", blocked=2)
    proc = processes.spawn(
        ["ingest", str(inputs), "--out", str(tmp_path / "s.zarr"), "--workers", "2", "--no-progress"]
    )
    wait_for(lambda: len(spawned_workers(proc.pid)) == 2, 60, "two ingest workers", proc)
    workers = children(proc.pid)
    time.sleep(0.5)  # let them reach the FIFOs
    proc.kill()
    proc.wait(timeout=10)
    try:
        wait_for(lambda: not any(alive(pid) for pid in workers), 10, "the orphaned workers to exit")
    finally:
        for pid in workers:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


@needs_proc
def test_sigint_of_ingest_is_one_line_and_leaves_a_resumable_store(processes, tmp_path: Path) -> None:
    inputs = fifo_inputs(tmp_path / "in", blocked=1, good=3)
    out = tmp_path / "s.zarr"
    proc = processes.spawn(["ingest", str(inputs), "--out", str(out), "--workers", "2", "--no-progress"])
    wait_for(lambda: images_written(out) == 3, 60, "the three good images", proc)
    workers = children(proc.pid)
    time.sleep(1.0)  # the parent collects them
    proc.send_signal(signal.SIGINT)
    output, _ = proc.communicate(timeout=15)
    assert proc.returncode == 130, output
    assert "Traceback" not in output and output.strip().splitlines()[-1].startswith(
        "ssl_med ingest: stopped by SIGINT: "
    )
    wait_for(lambda: not any(alive(pid) for pid in workers), 10, "the workers to exit")
    assert verify(str(out)).ok

    (inputs / "blocked0.npy").unlink()
    again = ingest([str(inputs)], str(out), progress=False)
    assert again.written + again.present == 3 and len(ImageStore(out)) == 3 and verify(str(out)).ok


@needs_proc
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_signal_stops_a_serial_ingest_inside_its_source(processes, tmp_path: Path, signum) -> None:
    """``--workers 1``: the source being read (a FIFO that never delivers) is abandoned, not waited for."""
    inputs = fifo_inputs(tmp_path / "in", blocked=0, good=2)
    os.mkfifo(inputs / "zblocked.npy")  # read after the good ones
    out = tmp_path / "s.zarr"
    proc = processes.spawn(["ingest", str(inputs), "--out", str(out), "--workers", "1", "--no-progress"])
    wait_for(lambda: images_written(out) == 2, 60, "the two good images", proc)
    time.sleep(1.0)  # in the FIFO's open()
    proc.send_signal(signum)
    output, _ = proc.communicate(timeout=15)
    assert proc.returncode == 128 + signum, output
    name = signal.Signals(signum).name
    last = output.strip().splitlines()[-1]
    assert "Traceback" not in output and last.startswith(
        f"ssl_med ingest: stopped by {name}: 2 images written"
    ), output
    assert verify(str(out)).ok and len(ImageStore(out)) == 2


def test_slurm_requeue_handlers_still_chain(monkeypatch) -> None:
    """Under SLURM with auto-requeue, Lightning keeps its requeue handler on SIGUSR1 and its SIGTERM
    handler calls ours too (read through Lightning's private signal connector: no public view exists)."""
    import lightning as L
    from lightning.fabric.plugins.environments import SLURMEnvironment

    from ssl_med.lifetimes import StopSignals

    for key, value in {"SLURM_NTASKS": "1", "SLURM_JOB_NAME": "x", "SLURM_JOB_ID": "1", "SLURM_PROCID": "0",
                       "SLURM_LOCALID": "0", "SLURM_NODEID": "0"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    with StopSignals("run") as stop:
        trainer = L.Trainer(plugins=[SLURMEnvironment(auto_requeue=True)], accelerator="cpu", devices=1,
                            logger=False, enable_checkpointing=False)  # fmt: skip
        connector = trainer._signal_connector
        connector.register_signal_handlers()
        try:
            requeue = signal.getsignal(signal.SIGUSR1)
            assert connector._slurm_sigusr_handler_fn in requeue.signal_handlers
            signal.getsignal(signal.SIGTERM)(signal.SIGTERM, None)
            assert stop.received == signal.SIGTERM and trainer.received_sigterm
        finally:
            connector.teardown()
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
