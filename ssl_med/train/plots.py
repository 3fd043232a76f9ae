"""A PNG of the training curves next to the TensorBoard logs, for a look without starting TensorBoard."""

from __future__ import annotations

from pathlib import Path

CURVES = ("train/loss", "collapse/embedding_std", "train/lr", "train/samples_per_s")


def plot_training_curves(tensorboard_dir: str | Path, out_file: str | Path) -> Path | None:
    """Plot the scalars in :data:`CURVES` (and every other ``train/*`` loss term) from TensorBoard events.

    Returns the written file, or ``None`` when there is nothing to plot.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tensorboard_dir))
    events.Reload()
    available = events.Tags().get("scalars", [])
    tags = [t for t in CURVES if t in available]
    tags += sorted(t for t in available if t.startswith("train/") and t not in tags)
    if not tags:
        return None
    fig, axes = plt.subplots(1, len(tags), figsize=(3.2 * len(tags), 2.8), squeeze=False)
    for ax, tag in zip(axes[0], tags):
        points = events.Scalars(tag)
        ax.plot([p.step for p in points], [p.value for p in points], lw=1.2)
        ax.set_title(tag, fontsize=9)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out = Path(out_file)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
