"""The checkpoint a run resumes from: ``last.ckpt``, or the newest readable step checkpoint beside it.

A checkpoint is written to a temporary file and renamed into place
(:class:`~ssl_med.train.callbacks.AtomicCheckpointIO`), but a disk that fills up, a copy that stops
half-way or a bad sector can still leave an empty or damaged ``last.ckpt``. Rather than stop the
run, ``resume=auto`` then warns and continues from the newest step checkpoint that reads cleanly:
the run repeats the steps since that checkpoint and ends exactly where it would have. The damaged
files are renamed ``*.damaged`` (kept for inspection, no longer candidates, and out of the way of
Lightning, which would otherwise write ``last-v1.ckpt`` beside an existing ``last.ckpt``).

A run that does not continue from its folder's own checkpoints (``resume=never``, or ``resume=<path>``
elsewhere) first moves the earlier run's results out of the way (:func:`set_aside_earlier_run`): left in
place, Lightning writes the new run's last checkpoint as ``last-v1.ckpt`` beside the earlier ``last.ckpt``,
and ``resume=auto``, ``ssl_med export`` and ``init_from`` then read the earlier run's weights.

Under ``trainer=fsdp`` a checkpoint is a folder of shards (:mod:`ssl_med.train.sharding`): it is
readable when ``torch.distributed.checkpoint``'s index (``.metadata``, written after every shard) and
Lightning's ``meta.pt`` (step, loops, callbacks) are there and ``meta.pt`` reads cleanly;
:func:`consolidate_checkpoint` makes an ordinary single-file checkpoint of one.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import time
import zipfile
from collections.abc import Sequence
from pathlib import Path

import torch

from ssl_med.evaluators.report import EARLIER_RUN_PREFIX

log = logging.getLogger(__name__)

_STEP = re.compile(r"step(\d+)")
#: infix of the temporary file a checkpoint is written to before it is renamed into place
PARTIAL_SAVE = ".tmp"
#: in a sharded checkpoint folder: torch.distributed.checkpoint's index, and Lightning's non-tensor state
SHARD_INDEX, SHARDED_META = ".metadata", "meta.pt"


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` cannot be resumed from, or ``None``.

    Checks what ``torch.save`` writes, a zip archive, member by member against their CRC-32s
    (reads the whole file once, keeps nothing in memory); whether its contents are a valid Lightning
    checkpoint is left to the load itself. A sharded checkpoint (a folder) needs its index and a clean
    ``meta.pt``; the shards themselves are checked by the load.
    """
    if path.is_dir():
        missing = [name for name in (SHARD_INDEX, SHARDED_META) if not (path / name).is_file()]
        if missing:
            return f"incomplete sharded checkpoint (no {' or '.join(missing)})"
        return checkpoint_problem(path / SHARDED_META)
    try:
        if path.stat().st_size == 0:
            return "empty file"
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (OSError, EOFError, zipfile.BadZipFile) as exc:
        return f"unreadable ({type(exc).__name__}: {exc})"
    return None if bad is None else f"corrupted (member {bad} fails its CRC)"


def step_checkpoints(directory: Path) -> list[Path]:
    """``step*.ckpt`` files in ``directory``, newest (highest step) first."""

    def step(path: Path) -> int:
        match = _STEP.match(path.stem)
        return int(match.group(1)) if match else -1

    return sorted(directory.glob("step*.ckpt"), key=lambda p: (step(p), p.stat().st_mtime), reverse=True)


def newest_good_checkpoint(directory: Path, last: str = "last.ckpt") -> Path | None:
    """``directory/last`` if it reads cleanly, else the newest clean step checkpoint (with a warning);
    ``None`` when there are no checkpoints. Raises ``ValueError`` when there are some but none is usable."""
    candidates = [p for p in [directory / last] if p.exists()] + step_checkpoints(directory)
    rejected: dict[Path, str] = {}
    for path in candidates:
        problem = checkpoint_problem(path)
        if problem is None:
            if rejected:
                log.warning("cannot resume from %s; resuming from %s instead (the steps since are repeated; "
                            "the damaged files are renamed *.damaged)",
                            "; ".join(f"{p} ({why})" for p, why in rejected.items()), path)  # fmt: skip
                for damaged in rejected:
                    _move_aside(damaged)
            return path
        rejected[path] = problem
    if rejected:
        raise ValueError(
            f"no usable checkpoint in {directory}: {'; '.join(f'{p} ({why})' for p, why in rejected.items())}"
        )
    return None


def remove_partial_saves(directory: Path) -> list[Path]:
    """Delete the temporary files of checkpoint saves that were killed before their rename
    (``.last.ckpt.tmp<pid>``, or a sharded save's ``.last.ckpt.tmp`` folder); returns them. Call before training starts, when nothing is being saved."""
    removed = []
    for path in directory.glob(f".*.ckpt{PARTIAL_SAVE}*"):
        with contextlib.suppress(FileNotFoundError):
            if path.is_dir():  # a sharded save's folder
                shutil.rmtree(path)
            else:
                path.unlink()
            removed.append(path)
    if removed:
        log.info("removed %d partial checkpoint file(s) of an interrupted save: %s", len(removed),
                 ", ".join(p.name for p in removed))  # fmt: skip
    return removed


def continues_here(ckpt_path: str | None, directory: Path) -> bool:
    """Whether a run resuming from ``ckpt_path`` (``None``: a fresh start) continues the checkpoints in
    ``directory``."""
    return ckpt_path is not None and Path(ckpt_path).resolve().parent == directory.resolve()


def set_aside_earlier_run(run_dir: Path, names: Sequence[str]) -> Path | None:
    """Move the ``names`` (files or folders) that exist in ``run_dir`` into ``run_dir/earlier-<time>/``
    with a warning, before a run that does not continue them starts there; returns that folder, or
    ``None`` when none of them existed. Nothing is deleted."""
    found = [run_dir / name for name in names if (run_dir / name).exists()]
    if not found:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target = run_dir / f"{EARLIER_RUN_PREFIX}{stamp}"
    n = 1
    while target.exists():
        n += 1
        target = run_dir / f"{EARLIER_RUN_PREFIX}{stamp}-{n}"
    target.mkdir()
    for path in found:
        path.replace(target / path.name)
    log.warning(
        "%s held an earlier run's %s; this run starts afresh (resume is not this folder's last checkpoint), so "
        "they are moved to %s (nothing is deleted; remove that folder when it is not needed)",
        run_dir, ", ".join(p.name for p in found), target,
    )  # fmt: skip
    return target


def _move_aside(path: Path) -> None:
    """Rename ``path`` to ``path.damaged`` (another process of the job may have done it already)."""
    with contextlib.suppress(FileNotFoundError):
        path.replace(path.with_name(path.name + ".damaged"))


def consolidate_checkpoint(folder: Path, out: Path) -> Path:
    """Write the sharded checkpoint ``folder`` as one ordinary checkpoint file ``out`` (full tensors,
    read without a process group; the whole state must fit in CPU memory), as Lightning's
    ``python -m lightning.fabric.utilities.consolidate_checkpoint`` does. ``ssl_med export`` reads the
    result like any ``.ckpt``. Returns ``out``."""
    from lightning.fabric.utilities.load import _load_distributed_checkpoint

    problem = checkpoint_problem(folder)
    if not folder.is_dir() or problem:
        raise ValueError(f"{folder}: not a readable sharded checkpoint ({problem or 'not a folder'})")
    state = _load_distributed_checkpoint(folder)
    tmp = out.with_name(f".{out.name}{PARTIAL_SAVE}")
    torch.save(state, tmp)
    tmp.replace(out)
    return out
