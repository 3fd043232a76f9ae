"""``ssl_med report DIR [OUT] [--metric NAME]``: one summary table (+ plots) from every ``results.json``
(and ``online_eval.json``) under ``DIR``, with a column per swept key, sorted by the metric."""

from __future__ import annotations

import sys

from ssl_med.commands import Command

USAGE = """usage: ssl_med report DIR [OUT] [--metric NAME]

Summarise every results.json and online_eval.json under DIR (e.g. a multirun folder) into
OUT/summary.md, summary.json and summary_*.png (OUT defaults to DIR). Each key a sweep varied
(from the runs' .hydra/overrides.yaml) gets a column; rows are sorted by NAME, highest first
(default: each evaluator's headline metric; online: linear_auroc), and with one numeric swept key
summary_sweep_<key>.png plots the metric against it."""


def _run(args: list[str]) -> int:
    metric = None
    if "--metric" in args:
        at = args.index("--metric")
        if at + 1 >= len(args):
            print("ssl_med report: --metric needs a name (e.g. --metric accuracy)", file=sys.stderr)
            return 2
        metric = args[at + 1]
        args = args[:at] + args[at + 2 :]
    if not args or args[0] in ("-h", "--help") or len(args) > 2:
        print(USAGE)
        return 0 if args and args[0] in ("-h", "--help") else 2
    from ssl_med.evaluators.report import write_summary

    try:
        path = write_summary(args[0], args[1] if len(args) > 1 else None, metric=metric)
    except FileNotFoundError as err:
        print(f"ssl_med report: {err}", file=sys.stderr)
        return 1
    print(path.read_text())
    print(f"written to {path}")
    return 0


COMMAND = Command(help="summary table and plots from a folder of evaluation results (e.g. a sweep)", run=_run)
