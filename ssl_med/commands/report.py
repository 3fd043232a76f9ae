"""``ssl_med report DIR [OUT] [--metric NAME] [--columns KEY,...]``: one summary table (+ plots) from every
``results.json`` (and ``online_eval.json``) under ``DIR``, with a column per swept key, sorted by the metric."""

from __future__ import annotations

import argparse
import sys

from ssl_med.commands import Command

DESCRIPTION = """Summarise every results.json and online_eval.json under DIR (e.g. a multirun folder) into
OUT/summary.md, summary.json and summary_*.png. Each key a sweep varied (from the runs'
.hydra/overrides.yaml) gets a column, except the run's folder and name (hydra.*, experiment: the run
column has them). Rows are sorted by the metric, highest first, and with one numeric swept key
summary_sweep_<key>.png plots the metric against it."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="ssl_med report", description=DESCRIPTION)
    parser.add_argument("dir", metavar="DIR", help="folder searched for results.json / online_eval.json")
    parser.add_argument("out", metavar="OUT", nargs="?", help="where the summary goes (default: DIR)")
    parser.add_argument(
        "--metric", metavar="NAME",
        help="sort and plot by this metric (default: each evaluator's headline metric; online: linear_auroc)",
    )  # fmt: skip
    parser.add_argument(
        "--columns", metavar="KEY,...", type=lambda text: [k.strip() for k in text.split(",") if k.strip()],
        help="only these swept keys get a column (e.g. --columns optim.lr,seed)",
    )  # fmt: skip
    return parser


def _run(args: list[str]) -> int:
    parsed = _parser().parse_args(args)
    from ssl_med.evaluators.report import write_summary

    try:
        path = write_summary(parsed.dir, parsed.out, metric=parsed.metric, keys=parsed.columns)
    except FileNotFoundError as err:
        print(f"ssl_med report: {err}", file=sys.stderr)
        return 1
    print(path.read_text())
    print(f"written to {path}")
    return 0


COMMAND = Command(help="summary table and plots from a folder of evaluation results (e.g. a sweep)", run=_run)
