"""Plots: probe metric vs label fraction, fine-tune val curves, segmentation overlays, weight-interpolation
curves, summaries.

All functions write a PNG (matplotlib's object API, no pyplot global state) and return its path.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.figure import Figure


def save_figure(fig: Figure, path: Path, dpi: int = 120) -> Path:
    """Lay out ``fig`` and write it to ``path`` (folders created); returns ``path``."""
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi)
    return path


def label_axes(ax: Any, xlabel: str, ylabel: str, title: str = "", legend_size: int = 8) -> None:
    """The decoration every line plot here shares: axis labels, a small title, a light grid, a legend."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)


def label_efficiency_plot(
    curves: dict[str, dict[str, dict[str, list[float]]]], metric: str, path: Path, title: str = ""
) -> Path:
    """``curves``: encoder label -> ``{fraction: {metric: [mean, std, n]}}``; x log-scaled fraction."""
    fig = Figure(figsize=(4.5, 3.2))
    ax = fig.subplots()
    for label, curve in curves.items():
        fractions = sorted(curve, key=float)
        mean = [curve[f][metric][0] for f in fractions]
        std = [curve[f][metric][1] for f in fractions]
        ax.errorbar([100 * float(f) for f in fractions], mean, yerr=std, marker="o", capsize=3, label=label)
    ax.set_xscale("log")
    label_axes(ax, "training labels (%)", f"linear probe test {metric}", title)
    return save_figure(fig, path)


def finetune_curves_plot(panels: dict[str, dict[str, list[dict[str, float]]]], metric: str, path: Path) -> Path:
    """One panel per ``panels`` item (title -> ``{line label: val history}``), each history a list of
    ``{"step": s, "val_<metric>": v}`` as the fine-tuner records it: the val curve of every fine-tune of the
    grid (step 0 of an LP-FT run is its probe); random-init lines are dashed."""
    fig = Figure(figsize=(4.2 * len(panels), 3.2))
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, (title, curves) in zip(axes, panels.items(), strict=True):
        for label, history in curves.items():
            ax.plot([h["step"] for h in history], [h[f"val_{metric}"] for h in history], marker=".",
                    linestyle="--" if label.startswith("random-init") else "-", label=label)
        label_axes(ax, "fine-tuning step", f"val {metric}", title, legend_size=6)
    return save_figure(fig, path)


def finetune_curves(rows: list[dict[str, Any]]) -> dict[str, list[dict[str, float]]]:
    """``results.json`` rows of a fine-tune -> ``{"<encoder> <read-out> lr=<lr> ld=<decay>": val history}``."""
    return {
        f"{row['encoder']} {g['features']} lr={g['lr']:g} ld={g['layer_decay']:g}": g["history"]
        for row in rows
        for g in row["details"].get("grid", [])
        if g.get("history")
    }


def overlay_png(
    image: np.ndarray, truth: np.ndarray, pred: np.ndarray, num_classes: int, path: Path, title: str = ""
) -> Path:
    """Image | truth | prediction for a 2D item (``image`` ``(C, H, W)``, maps ``(H, W)``) or the 3D
    axial slice (axis 0) with the most foreground in ``truth`` (``(C, D, H, W)``, ``(D, H, W)``)."""
    if truth.ndim == 3:
        z = int(np.argmax((truth > 0).sum(axis=(1, 2))))
        image, truth, pred = image[:, z], truth[z], pred[z]
    fig = Figure(figsize=(7.5, 2.8))
    axes = fig.subplots(1, 3)
    gray = image[0]
    for ax, (name, seg) in zip(axes, (("image", None), ("truth", truth), ("prediction", pred))):
        ax.imshow(gray, cmap="gray", vmin=0, vmax=1)
        if seg is not None:
            ax.imshow(
                np.ma.masked_where(seg == 0, seg),
                cmap="jet",
                vmin=1,
                vmax=max(num_classes - 1, 1),
                alpha=0.5,
                interpolation="nearest",
            )
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.suptitle(title, fontsize=9)
    return save_figure(fig, path, dpi=100)


def interpolation_plot(
    curve: list[dict[str, Any]], path: Path, keys: tuple[str, ...] = ("dice_mean", "probe_auroc")
) -> Path:
    """Metrics vs interpolation weight alpha (0 = pretrained encoder, 1 = fine-tuned encoder)."""
    fig = Figure(figsize=(4.5, 3.2))
    ax = fig.subplots()
    alphas = [p["alpha"] for p in curve]
    for key in keys:
        if key in curve[0]:
            ax.plot(alphas, [p[key] for p in curve], marker="o", label=key)
    ax.set_xlabel("alpha (0 = pretrained, 1 = fine-tuned)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def summary_bar_plot(rows: list[dict[str, Any]], metric: str, path: Path) -> Path:
    """One bar per row (``row['run']`` label) for ``metric``; rows without it are skipped."""
    rows = [r for r in rows if isinstance(r.get(metric), int | float) and np.isfinite(r[metric])]
    fig = Figure(figsize=(max(4.0, 0.5 * len(rows) + 2), 3.4))
    ax = fig.subplots()
    labels = [
        f"{r.get('eval', '')}/{r.get('data', '')}\n{r.get('run', '')} {r.get('encoder', '')}" for r in rows
    ]
    colors = ["tab:gray" if r.get("encoder") == "random-init" else "tab:blue" for r in rows]
    ax.bar(range(len(rows)), [r[metric] for r in rows], color=colors)
    ax.set_xticks(range(len(rows)), labels, rotation=60, ha="right", fontsize=6)
    ax.set_ylabel(metric)
    return save_figure(fig, path)


def sweep_plot(series: dict[str, list[tuple[float, float]]], key: str, path: Path) -> Path:
    """Metric vs a swept value: one line per ``series`` label (``[(value, metric), ...]``); the x axis
    is logarithmic when the values are positive and span a factor of 10 or more (learning rates)."""
    fig = Figure(figsize=(5.0, 3.4))
    ax = fig.subplots()
    xs = [x for points in series.values() for x, _ in points]
    for label, points in series.items():
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=label)
    if xs and min(xs) > 0 and max(xs) >= 10 * min(xs):
        ax.set_xscale("log")
    label_axes(ax, key, "metric (higher is better)", legend_size=7)
    return save_figure(fig, path)
