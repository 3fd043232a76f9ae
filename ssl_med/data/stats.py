"""Per-channel intensity statistics recorded for every stored image (the loaders' normalisation window)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np


def intensity_stats(array: np.ndarray) -> dict[str, list[float]]:
    """Per-channel robust statistics of ``(C, *spatial)`` (finite values only)."""
    stats: dict[str, list[float]] = {"p0.5": [], "p99.5": [], "mean": [], "std": [], "min": [], "max": []}
    for channel in array:
        values = channel[np.isfinite(channel)] if channel.dtype.kind == "f" else channel.reshape(-1)
        values = values.astype(np.float64)
        if values.size > 2_000_000:  # a strided sample is plenty for percentiles
            values = values[:: values.size // 2_000_000]
        lo, hi = np.percentile(values, [0.5, 99.5]) if values.size else (0.0, 0.0)
        stats["p0.5"].append(float(lo))
        stats["p99.5"].append(float(hi))
        stats["mean"].append(float(values.mean()) if values.size else 0.0)
        stats["std"].append(float(values.std()) if values.size else 0.0)
        stats["min"].append(float(values.min()) if values.size else 0.0)
        stats["max"].append(float(values.max()) if values.size else 0.0)
    return stats


def percentile_window(stats: Mapping[str, Sequence[float]]) -> np.ndarray:
    """``(C, 2)`` float32: each channel's 0.5 and 99.5 percentiles from an :func:`intensity_stats` record,
    the window an image is scaled to ``[0, 1]`` by (``data.intensity_window=image``)."""
    return np.stack([stats["p0.5"], stats["p99.5"]], axis=-1).astype(np.float32)


def stack_intensity_stats(images: np.ndarray, block: int = 64) -> list[dict[str, list[float]]]:
    """:func:`intensity_stats` of every row of a stack ``(N, C, *spatial)``, vectorised over blocks of rows."""
    out: list[dict[str, list[float]]] = []
    n, c = images.shape[:2]
    for start in range(0, n, block):
        flat = images[start : start + block].reshape(-1, c, int(np.prod(images.shape[2:]))).astype(np.float64)
        pct = np.nanpercentile if images.dtype.kind == "f" else np.percentile
        lo, hi = pct(flat, [0.5, 99.5], axis=2)
        stats = {"p0.5": lo, "p99.5": hi, "mean": np.nanmean(flat, axis=2), "std": np.nanstd(flat, axis=2),
                 "min": np.nanmin(flat, axis=2), "max": np.nanmax(flat, axis=2)}  # fmt: skip
        out += [{k: [float(x) for x in v[i]] for k, v in stats.items()} for i in range(flat.shape[0])]
    return out
