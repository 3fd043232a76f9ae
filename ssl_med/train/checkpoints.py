"""The checkpoint a run resumes from: ``last.ckpt``, or the newest readable step checkpoint beside it.

A checkpoint is written to a temporary file and renamed into place
(:class:`~ssl_med.train.callbacks.AtomicCheckpointIO`), but a disk that fills up, a copy that stops
half-way or a bad sector can still leave an empty or damaged ``last.ckpt``. Rather than stop the
run, ``resume=auto`` then warns and continues from the newest step checkpoint that reads cleanly:
the run repeats the steps since that checkpoint and ends exactly where it would have. The damaged
files are renamed ``*.damaged`` (kept for inspection, no longer candidates, and out of the way of
Lightning, which would otherwise write ``last-v1.ckpt`` beside an existing ``last.ckpt``).
"""

from __future__ import annotations

import contextlib
import logging
import re
import zipfile
from pathlib import Path

log = logging.getLogger(__name__)

_STEP = re.compile(r"step(\d+)")
#: infix of the temporary file a checkpoint is written to before it is renamed into place
PARTIAL_SAVE = ".tmp"


def checkpoint_problem(path: Path) -> str | None:
    """Why ``path`` cannot be resumed from, or ``None``.

    Checks what ``torch.save`` writes, a zip archive, member by member against their CRC-32s
    (reads the whole file once, keeps nothing in memory); whether its contents are a valid Lightning
    checkpoint is left to the load itself.
    """
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
    candidates = [p for p in [directory / last] if p.is_file()] + step_checkpoints(directory)
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
    (``.last.ckpt.tmp<pid>``); returns them. Call before training starts, when nothing is being saved."""
    removed = []
    for path in directory.glob(f".*.ckpt{PARTIAL_SAVE}*"):
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
            removed.append(path)
    if removed:
        log.info("removed %d partial checkpoint file(s) of an interrupted save: %s", len(removed),
                 ", ".join(p.name for p in removed))  # fmt: skip
    return removed


def _move_aside(path: Path) -> None:
    """Rename ``path`` to ``path.damaged`` (another process of the job may have done it already)."""
    with contextlib.suppress(FileNotFoundError):
        path.replace(path.with_name(path.name + ".damaged"))
