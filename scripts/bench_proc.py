"""Per-process measurements shared by the benchmark scripts (Linux).

``proc_status_mib`` reads a process's resident memory from ``/proc/<pid>/status`` (``VmHWM``: the peak
resident set, ``VmRSS``: the current one); ``run_in_subprocess`` runs one configuration of a script in a
fresh interpreter, so that each configuration's peak memory is its own; ``best_time`` is the shortest of
a few timings of a call; ``write_doc`` replaces a script's generated block of a markdown file and keeps the
hand-written text around it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any


def best_time(fn: Callable[[], object], repeats: int) -> float:
    """The shortest of ``repeats`` wall-clock timings of ``fn()``, in seconds."""
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def write_doc(doc: Path, body: str, begin: str, end: str) -> None:
    """Replace the block between the ``begin`` and ``end`` markers of ``doc`` by ``body``; everything outside
    the markers is kept. Without both markers the block is appended (a new file holds the block alone)."""
    text = doc.read_text() if doc.is_file() else ""
    block = f"{begin}\n{body.strip()}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + block + "\n"
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(text)


def proc_status_mib(key: str = "VmHWM", pid: int | str = "self") -> float:
    """``key`` (``VmHWM``, ``VmRSS``, ...) of process ``pid`` in MiB; NaN where the kernel does not report it."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def run_in_subprocess(
    script: str | Path, spec: Any, timeout: float, flag: str = "--one", env: dict[str, str] | None = None
) -> dict[str, Any]:
    """``python <script> <flag> <spec as JSON>`` in a fresh process; its result is the last line of its
    standard output that is a JSON object. A failure or timeout returns ``{"error": <reason>}``."""
    script = Path(script).resolve()
    try:
        proc = subprocess.run(  # run from the repository root (the script's parent folder's parent)
            [sys.executable, str(script), flag, json.dumps(spec)],
            capture_output=True, text=True, timeout=timeout, cwd=script.parents[1],
            env=env or os.environ.copy(),
        )  # fmt: skip
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f} s"}
    line = next((ln for ln in reversed(proc.stdout.splitlines()) if ln.startswith("{")), None)
    if proc.returncode != 0 or line is None:
        return {"error": (proc.stderr.strip().splitlines() or ["no output"])[-1][:160]}
    return json.loads(line)
