"""``ssl_med report DIR [OUT]``: one summary table (+ plots) from every ``results.json`` under ``DIR``."""

from __future__ import annotations

import sys

from ssl_med.commands import Command


def _run(args: list[str]) -> int:
    if not args or args[0] in ("-h", "--help") or len(args) > 2:
        print(
            "usage: ssl_med report DIR [OUT]\n\nSummarise every results.json under DIR (e.g. a multirun folder)\n"
            "into OUT/summary.md, summary.json and summary_*.png (OUT defaults to DIR)."
        )
        return 0 if args and args[0] in ("-h", "--help") else 2
    from ssl_med.evaluators.report import write_summary

    try:
        path = write_summary(args[0], args[1] if len(args) > 1 else None)
    except FileNotFoundError as err:
        print(f"ssl_med report: {err}", file=sys.stderr)
        return 1
    print(path.read_text())
    print(f"written to {path}")
    return 0


COMMAND = Command(help="summary table and plots from a folder of evaluation results (e.g. a sweep)", run=_run)
