"""Runs that are killed or signalled: a kill inside a checkpoint save, SIGTERM and SIGINT during
pretraining, SIGINT and ``kill -9`` of a parallel ingest."""

from __future__ import annotations

from pathlib import Path

import torch

from ssl_med.cli import main as cli
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
