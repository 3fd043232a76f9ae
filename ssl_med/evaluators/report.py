"""Evaluation outputs: ``results.json``, ``results.md``, TensorBoard scalars, and sweep summaries.

One evaluation folder holds ``results.json``::

    {"eval": "linear_probe", "data": "breastmnist", "checkpoint": "...", "encoder": {...backbone...},
     "rows": [{"encoder": "pretrained", "metrics": {...}, "details": {...}},
              {"encoder": "random-init", ...}],
     "published": {"ResNet-18 (28)": {"auroc": 0.901, "accuracy": 0.863}, ...},
     "config": {"eval": {...}, "eval_data": {...}}}

:func:`collect` finds every ``results.json`` under a folder (e.g. a Hydra multirun) and
:func:`write_summary` turns them into one table (``summary.md``/``summary.json``/``summary.png``),
with one column per swept key (from each run's ``.hydra/overrides.yaml``, :mod:`.sweep`), rows
sorted by the chosen metric, and ``summary_sweep_<key>.png`` (metric vs value) when exactly one swept
key is numeric.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback

from ssl_med.evaluators.sweep import by_metric, is_number, numeric_keys, run_overrides, swept_keys

log = logging.getLogger(__name__)

RESULTS_NAME = "results.json"
ONLINE_EVAL_FILE = "online_eval.json"  # written by ssl_med.train.online_eval
EARLIER_RUN_PREFIX = "earlier-"  # a run folder's set-aside earlier run (ssl_med.train.checkpoints): not a run of its own
HEADLINE = {"linear_probe": "auroc", "finetune": "auroc", "knn": "accuracy", "segmentation": "dice_mean"}
ONLINE_METRICS = ("knn_accuracy", "knn_auroc", "linear_auroc")
META = ("run", "eval", "data", "backbone", "objective", "encoder")


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else f"{value:.3f}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """A GitHub markdown table of ``rows`` (dicts) over ``columns`` (missing cells are blank)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def metric_columns(rows: list[dict[str, Any]]) -> list[str]:
    """Metric names in a stable order: headline metrics first, per-class/per-label values last."""
    seen: list[str] = []
    for row in rows:
        for key in row:
            if key not in seen:
                seen.append(key)
    first = ["auroc", "accuracy", "balanced_accuracy", "auroc_votes", "dice_mean"]
    return [k for k in first if k in seen] + sorted(k for k in seen if k not in first)


def results_markdown(results: dict[str, Any]) -> str:
    """The markdown of one evaluation: metric table (with published rows) and label-efficiency table."""
    rows = [{"encoder": r["encoder"], **_headline_metrics(r)} for r in results["rows"]]
    published = [
        {"encoder": f"{name} (published, supervised)", **m}
        for name, m in results.get("published", {}).items()
    ]
    columns = ["encoder", *metric_columns([_headline_metrics(r) for r in results["rows"]])]
    parts = [
        f"## {results['eval']} on {results['data']}",
        "",
        f"checkpoint: `{results.get('checkpoint')}`",
        "",
        markdown_table(rows + published, columns),
    ]
    parts += _subsets_markdown(results["rows"])
    curves = [
        (r["encoder"], r["details"]["label_efficiency"])
        for r in results["rows"]
        if "label_efficiency" in r["details"]
    ]
    if curves:
        fractions = list(curves[0][1])
        table = []
        for label, curve in curves:
            row = {"encoder": label}
            for f in fractions:
                for metric in ("auroc", "accuracy"):
                    mean, std, _ = curve[f][metric]
                    row[f"{metric} @ {float(f) * 100:g}%"] = f"{mean:.3f} ± {std:.3f}"
            table.append(row)
        parts += [
            "",
            "Label efficiency (linear probe, test; mean ± std over seeds):",
            "",
            markdown_table(table, list(table[0])),
        ]
    return "\n".join(parts) + "\n"


def _subsets_markdown(rows: list[dict[str, Any]]) -> list[str]:
    """The per-channel-subset table (``eval.channel_subsets``): one line per (encoder, subset), or none."""
    table = [
        {"encoder": r["encoder"], "channels": sub["subset"], **sub["metrics"]}
        for r in rows
        for sub in r["details"].get("subsets", [])
    ]
    if not table:
        return []
    columns = ["encoder", "channels", *metric_columns([{k: v for k, v in t.items() if k not in ("encoder", "channels")}
                                                       for t in table])]  # fmt: skip
    return ["", "Per channel subset (eval.channel_subsets; the table above is the first subset's):", "",
            markdown_table(table, columns)]  # fmt: skip


def _headline_metrics(row: dict[str, Any]) -> dict[str, Any]:
    """A result row's metrics without the per-subset copies (``<subset>/<metric>``, tabled apart)."""
    prefixes = tuple(f"{sub['subset']}/" for sub in row["details"].get("subsets", []))
    return {k: v for k, v in row["metrics"].items() if not (prefixes and k.startswith(prefixes))}


def write_tensorboard(results: dict[str, Any], log_dir: Path) -> None:
    """Scalars ``<eval>/<data>/<encoder>/<metric>``; curves (label efficiency, training loss) by step."""
    from torch.utils.tensorboard import SummaryWriter

    with SummaryWriter(str(log_dir)) as writer:
        prefix = f"{results['eval']}/{results['data']}"
        for row in results["rows"]:
            tag = f"{prefix}/{row['encoder']}"
            for name, value in row["metrics"].items():
                if isinstance(value, int | float) and math.isfinite(value):
                    writer.add_scalar(f"{tag}/{name}", value, 0)
            for fraction, metrics in row["details"].get("label_efficiency", {}).items():
                for name, (mean, _, _) in metrics.items():
                    writer.add_scalar(f"{tag}/label_efficiency/{name}", mean, round(float(fraction) * 100))
            for record in row["details"].get("history", []):
                for name, value in record.items():
                    if name != "step":
                        writer.add_scalar(f"{tag}/train/{name}", value, record["step"])


def write_results(results: dict[str, Any], out_dir: Path) -> Path:
    """Write ``results.json``, ``results.md`` and ``tensorboard/`` into ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / RESULTS_NAME).write_text(json.dumps(results, indent=2, default=str))
    (out_dir / "results.md").write_text(results_markdown(results))
    write_tensorboard(results, out_dir / "tensorboard")
    return out_dir / RESULTS_NAME


def _found(root: Path, name: str) -> list[Path]:
    """The files ``name`` under ``root``, sorted, except those in an earlier run set aside inside a run
    folder (``earlier-<time>/``): they belong to the run that replaced them."""
    return [p for p in sorted(root.rglob(name)) if not any(part.startswith(EARLIER_RUN_PREFIX) for part in p.relative_to(root).parts[:-1])]


def collect(root: str | Path) -> list[dict[str, Any]]:
    """Flat rows (one per encoder per ``results.json`` under ``root``): run, eval, data, encoder, metrics,
    and ``overrides`` (the run's Hydra overrides, :func:`~ssl_med.evaluators.sweep.run_overrides`)."""
    root = Path(root)
    rows = []
    for path in _found(root, RESULTS_NAME):
        results = json.loads(path.read_text())
        backbone = results.get("encoder", {}).get("backbone", {})
        objective = results.get("encoder", {}).get("objective", {})
        for row in results["rows"]:
            rows.append(
                {
                    "run": str(path.parent.relative_to(root)) or ".",
                    "eval": results["eval"],
                    "data": results["data"],
                    "backbone": backbone.get("name", ""),
                    "objective": objective.get("name", "") if row["encoder"] != "random-init" else "-",
                    "encoder": row["encoder"],
                    **{k: v for k, v in row["metrics"].items() if "/" not in k},
                    "overrides": run_overrides(path, root),
                }
            )
    return rows


def collect_online(root: str | Path) -> list[dict[str, Any]]:
    """One row per pretraining run under ``root`` with an ``online_eval.json``: the online metrics at
    the last evaluation and at step 0 (the random-init reference of the same run), the student's at the
    last evaluation where it was read (``online_eval.student``), val split, and the run's ``overrides``."""
    root = Path(root)
    rows = []
    for path in _found(root, ONLINE_EVAL_FILE):
        record = json.loads(path.read_text())
        history = record.get("history") or []
        if not history:
            continue
        first, last = history[0], history[-1]
        row = {"run": str(path.parent.relative_to(root)) or ".", "data": record.get("data", ""), "step": last["step"]}
        for name in ONLINE_METRICS:
            row[name] = last[name]
            row[f"{name} @0"] = first[name]
            if f"student_{name}" in last:  # online_eval.student: the student beside the EMA teacher
                row[f"student {name}"] = last[f"student_{name}"]
        row["overrides"] = run_overrides(path, root)
        rows.append(row)
    return rows


def _sweep_columns(rows: list[dict[str, Any]], keys: list[str]) -> dict[str, str]:
    """``{swept key: column name}``, leaving out keys that only repeat a column (``backbone=vit,mamba``
    is the backbone column already); a key named like a column that says something else (``data``, the
    pretraining data, beside the evaluation's) becomes ``<key> (override)``."""
    columns = {}
    for key in keys:
        if key in META and all(str(r.get(key, "")) == str(r["overrides"].get(key, r.get(key, ""))) for r in rows):
            continue
        columns[key] = f"{key} (override)" if key in META else key
    return columns


def _with_sweep(rows: list[dict[str, Any]], columns: dict[str, str]) -> list[dict[str, Any]]:
    """The rows with a cell per swept key (blank where a run did not set it; numbers in ``%g``, so
    ``3e-4`` is not rounded to three decimals), ``overrides`` dropped."""

    def text(value: Any) -> str:
        return f"{value:g}" if is_number(value) else str(value)

    return [
        {**{k: v for k, v in r.items() if k != "overrides"}, **{c: text(r["overrides"].get(k, "")) for k, c in columns.items()}}
        for r in rows
    ]


def _headline(rows: list[dict[str, Any]], eval_name: str, metric: str | None) -> str:
    """``metric`` where rows of ``eval_name`` report it, else the evaluator's headline metric."""
    if metric and any(metric in r for r in rows if r["eval"] == eval_name):
        return metric
    return HEADLINE.get(eval_name, metric or "")


def sweep_series(
    rows: list[dict[str, Any]], online: list[dict[str, Any]], key: str, columns: dict[str, str],
    metric: str | None, online_metric: str,
) -> dict[str, list[tuple[float, float]]]:
    """Metric vs the numeric swept ``key``: one series per (evaluation, data, other swept values) of
    the pretrained encoders, and one per data set of the online (val) metric; several runs at one
    value (seeds) are averaged."""
    others = [k for k in columns if k != key]
    grouped: dict[str, dict[float, list[float]]] = {}

    def add(label: str, row: dict[str, Any], name: str) -> None:
        x, y = row["overrides"].get(key), row.get(name)
        if is_number(x) and is_number(y):
            rest = ", ".join(f"{k}={row['overrides'].get(k, '')}" for k in others)
            grouped.setdefault(label + (f" ({rest})" if rest else ""), {}).setdefault(float(x), []).append(float(y))

    for row in rows:
        if row["encoder"] != "random-init":
            name = _headline(rows, row["eval"], metric)
            add(f"{row['eval']} {row['data']} {name}", row, name)
    for row in online:
        add(f"online {row['data']} {online_metric}", row, online_metric)
    return {label: sorted((x, sum(ys) / len(ys)) for x, ys in points.items()) for label, points in grouped.items()}


def write_summary(
    root: str | Path, out_dir: str | Path | None = None, metric: str | None = None, keys: list[str] | None = None
) -> Path:
    """Summarise every ``results.json`` under ``root`` into ``summary.{md,json,png}`` in ``out_dir``
    (default ``root``), with a table of the online (val) metrics of every pretraining run found.

    Both tables get one column per swept key (:func:`~ssl_med.evaluators.sweep.swept_keys` over the
    runs' Hydra overrides; ``keys`` keeps only those named) and are sorted by ``metric``, highest
    first (per evaluation and data set; default: each evaluator's headline metric, ``linear_auroc``
    online). When exactly one swept key is numeric, ``summary_sweep_<key>.png`` plots the metric against it.
    """
    from ssl_med.evaluators.plots import summary_bar_plot, sweep_plot

    rows = collect(root)
    online = collect_online(root)
    if not rows and not online:
        raise FileNotFoundError(f"no {RESULTS_NAME} or {ONLINE_EVAL_FILE} found under {root}")
    out = Path(out_dir or root)
    out.mkdir(parents=True, exist_ok=True)
    columns = _sweep_columns(rows + online, swept_keys((r["overrides"] for r in rows + online), only=keys))
    for key in [k for k in keys or [] if k not in columns]:
        log.warning(
            "report --columns: no column of its own for %r: the runs under %s do not set it to different values "
            "(or the table shows it already)", key, root,
        )  # fmt: skip
    online_metric = metric if metric in ONLINE_METRICS else "linear_auroc"
    online_md = ""
    if online:
        online.sort(key=lambda r: (r["data"], by_metric(online_metric)(r), r["run"]))
        table = ["run", *columns.values(), "data", "step"]
        table += [c for name in ONLINE_METRICS for c in (name, f"{name} @0")]
        table += [f"student {name}" for name in ONLINE_METRICS if any(f"student {name}" in r for r in online)]
        online_md = (
            f"\n## Online evaluation (val split; @0 = step 0, the run's random init; sorted by {online_metric})\n\n"
            + markdown_table(_with_sweep(online, columns), table) + "\n"
        )
        (out / "summary_online.json").write_text(json.dumps(online, indent=2))
    if rows:
        sort_by = {r["eval"]: by_metric(_headline(rows, r["eval"], metric)) for r in rows}
        rows.sort(key=lambda r: (r["data"], r["eval"], r["encoder"] == "random-init", sort_by[r["eval"]](r), r["run"]))
        table = ["run", *columns.values(), *META[1:]]
        flat = _with_sweep(rows, columns)
        table += metric_columns([{k: v for k, v in r.items() if k not in table} for r in flat])
        (out / "summary.json").write_text(json.dumps(rows, indent=2))
        (out / "summary.md").write_text(markdown_table(flat, table) + "\n" + online_md)
        for eval_name, name in HEADLINE.items():
            chosen = [r for r in rows if r["eval"] == eval_name]
            if chosen:
                summary_bar_plot(chosen, name, out / f"summary_{eval_name}_{name}.png")
    else:
        (out / "summary.md").write_text(online_md.lstrip())
    numeric = numeric_keys((r["overrides"] for r in rows + online), columns)
    if len(numeric) == 1:
        series = sweep_series(rows, online, numeric[0], columns, metric, online_metric)
        if series:
            safe = "".join(c if c.isalnum() or c in "._-" else "_" for c in numeric[0])
            sweep_plot(series, numeric[0], out / f"summary_sweep_{safe}.png")
    return out / "summary.md"


class SummaryCallback(Callback):
    """Hydra callback: after a multirun, write the sweep summary into the sweep folder.

    Enable with ``hydra.callbacks.summary._target_: ssl_med.evaluators.report.SummaryCallback``;
    ``hydra.callbacks.summary.metric`` sorts (and plots) by that metric instead of the headline ones.
    """

    def __init__(self, metric: str | None = None) -> None:
        self.metric = metric

    def on_multirun_end(self, config: Any, **kwargs: Any) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        try:
            print(f"summary written to {write_summary(sweep_dir, metric=self.metric)}")
        except FileNotFoundError as err:
            print(f"no summary: {err}")
