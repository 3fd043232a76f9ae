"""Missing-sequence synthesis with a BM-MAE model: a held-out sequence reconstructed from the others,
scored by PSNR and SSIM (MONAI's ``PSNRMetric`` / ``SSIMMetric``, data range 1 on ``[0, 1]`` crops)
and drawn as a picture (the other sequences | the held-out truth | its synthesis, middle slice).

BM-MAE's decoder reconstructs every modality from whatever tokens the encoder saw
(:meth:`objectives.bm_mae.BMMAE.reconstruct`), so a sequence missing from a protocol can be
synthesised from the rest; this is the "reconstruct the missing sequence" check of issue #19.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from objectives.bm_mae import BMMAE


def held_out_index(objective: BMMAE, batch: dict[str, Any], held_out: str | int) -> int:
    """The channel index of ``held_out`` (a name among the objective's loss-term names, or an index)."""
    if isinstance(held_out, int):
        return held_out
    names = objective.term_names(batch)
    if held_out.lower() not in names:
        raise ValueError(f"{held_out!r} is not one of the sequences {names}")
    return names.index(held_out.lower())


@torch.no_grad()
def synthesis_scores(objective: BMMAE, batch: dict[str, Any], held_out: str | int) -> tuple[dict[str, float], Tensor]:
    """PSNR and SSIM of the held-out sequence synthesised from all patches of the others.

    Args:
        objective: a (trained) BM-MAE objective.
        batch: ``{"image": (B, M, *S) in [0, 1], "channel_names": ...}``.
        held_out: the sequence to synthesise (name or channel index).

    Returns:
        ``{"psnr": dB, "ssim": x}`` (means over the batch) and the synthesis ``(B, 1, *S)`` clipped to ``[0, 1]``.
    """
    from monai.metrics import PSNRMetric, SSIMMetric

    images = batch["image"].float()
    index = held_out_index(objective, batch, held_out)
    available = torch.ones(images.shape[:2], dtype=torch.bool, device=images.device)
    available[:, index] = False
    objective.eval()
    synth = objective.reconstruct(batch, available)[:, index : index + 1].clamp(0.0, 1.0)
    truth = images[:, index : index + 1]
    psnr = PSNRMetric(max_val=1.0)(synth, truth)
    ssim = SSIMMetric(spatial_dims=images.ndim - 2, data_range=1.0, win_size=min(7, min(images.shape[2:])))(synth, truth)
    return {"psnr": float(psnr.mean()), "ssim": float(ssim.mean())}, synth


def synthesis_figure(
    images: Tensor, synth: Tensor, names: list[str], held_out: int, path: str | Path, title: str = ""
) -> Path:
    """PNG of image 0: each available sequence, the held-out truth and its synthesis (middle slice
    along the first spatial axis for volumes). ``images`` ``(B, M, *S)``, ``synth`` ``(B, 1, *S)``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def plane(x: Tensor) -> np.ndarray:
        x = x.detach().float().cpu()
        return (x[x.shape[0] // 2] if x.ndim == 3 else x).numpy()

    panels = [(plane(images[0, i]), n) for i, n in enumerate(names) if i != held_out]
    panels += [(plane(images[0, held_out]), f"{names[held_out]} (truth)"), (plane(synth[0, 0]), f"{names[held_out]} (synthesised)")]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.2 * len(panels), 2.4))
    for ax, (img, label) in zip(np.atleast_1d(axes), panels):
        ax.imshow(img, cmap="gray", vmin=0, vmax=1)
        ax.set_title(label, fontsize=8)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
