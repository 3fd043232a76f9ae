"""A PNG of the training curves, drawn from ``metrics.jsonl`` (written whatever the loggers), for a look
without starting TensorBoard or a tracking server."""

from __future__ import annotations

from pathlib import Path

CURVES = ("train/loss", "collapse/embedding_std", "collapse/effective_rank", "train/lr", "train/samples_per_s")
SCHEDULES = {"train/lr"}  # exact values, drawn unsmoothed
ONLINE = ("online/knn_auroc", "online/linear_auroc", "online/knn_accuracy")  # sparse: drawn as points, unsmoothed


def _smooth(values: list[float], weight: float = 0.8) -> list[float]:
    """Exponential moving average (TensorBoard's smoothing), bias-corrected at the start."""
    out, avg = [], 0.0
    for i, v in enumerate(values, start=1):
        avg = weight * avg + (1 - weight) * v
        out.append(avg / (1 - weight**i))
    return out


def plot_training_curves(metrics_file: str | Path, out_file: str | Path) -> Path | None:
    """Plot the scalars in :data:`CURVES`, every other ``train/*`` loss term and the :data:`ONLINE`
    evaluation curve (with its step-0 random-init value dashed, and the student's beside the teacher's where
    ``online/student_*`` was logged) from a run's ``metrics.jsonl``
    (:func:`ssl_med.train.loggers.read_metrics`).

    Returns the written file, or ``None`` when there is nothing to plot.
    """
    from matplotlib.figure import Figure

    from ssl_med.evaluators.plots import save_figure
    from ssl_med.train.loggers import read_metrics

    series = read_metrics(metrics_file)
    available = list(series)
    tags = [t for t in CURVES if t in available]
    tags += sorted(t for t in available if t.startswith("train/") and t not in tags)
    tags += sorted(t for t in available if t in ONLINE)
    if not tags:
        return None
    fig = Figure(figsize=(3.2 * len(tags), 2.8))
    axes = fig.subplots(1, len(tags), squeeze=False)
    for ax, tag in zip(axes[0], tags):
        steps, values = [s for s, _ in series[tag]], [v for _, v in series[tag]]
        if tag in SCHEDULES:
            ax.plot(steps, values, lw=1.6, color="C0")
        elif tag in ONLINE:  # step 0 is the random-init reference: a dashed line across
            student = series.get(tag.replace("online/", "online/student_", 1))  # online_eval.student
            ax.plot(steps, values, lw=1.2, marker="o", ms=3, color="C1", label="teacher" if student else None)
            ax.axhline(values[0], ls="--", lw=0.8, color="grey")
            if student:
                ax.plot([s for s, _ in student], [v for _, v in student], lw=1.2, marker="s", ms=3, color="C2", label="student")
                ax.legend(fontsize=7)
        else:  # per-batch values are noisy: faint raw values under the smoothed trend
            ax.plot(steps, values, lw=0.8, alpha=0.35, color="C0")
            ax.plot(steps, _smooth(values), lw=1.6, color="C0")
        ax.set_title(tag, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    return save_figure(fig, Path(out_file), dpi=110)
