"""Frozen-encoder features, extracted once and cached on disk.

``extract_features`` runs the encoder in ``eval()`` mode under ``torch.no_grad`` and returns
``(N, D)`` (``pooled``, ``mean_patch``), ``(N, 2D)`` (``pooled+mean_patch``: pooled embedding
concatenated with the mean patch token, DINOv2's linear-eval variant) or ``(N, P * D)`` (``patch_tokens``:
every final patch token in raster order, concatenated — a linear read-out of the whole token map,
which keeps where things are; pooling keeps only what). ``cached_features`` stores them as
``<cache_dir>/<encoder hash>/<dataset key>.npz`` so a probe sweep, kNN and label-efficiency runs on
the same checkpoint and dataset pay for one forward pass.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch

from ssl_med.encoder import Encoder

FEATURE_MODES = ("pooled", "pooled+mean_patch", "mean_patch", "patch_tokens")


def encoder_fingerprint(encoder: Encoder) -> str:
    """16-hex-digit SHA-256 of the encoder's class and state dict (names, shapes, values)."""
    digest = hashlib.sha256(type(encoder).__qualname__.encode())
    for name, tensor in sorted(encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def extract_features(
    encoder: Encoder, images: torch.Tensor, mode: str = "pooled", batch_size: int = 64, device: str = "cpu"
) -> np.ndarray:
    """``images`` ``(N, C, *S)`` -> features ``(N, D)``, ``(N, 2D)`` or ``(N, P * D)`` float32 (see the module
    docstring)."""
    if mode not in FEATURE_MODES:
        raise ValueError(f"unknown feature mode {mode!r}; choose one of {FEATURE_MODES}")
    was_training = encoder.training
    encoder.eval().to(device)
    chunks = []
    for start in range(0, len(images), batch_size):
        out = encoder(images[start : start + batch_size].to(device))
        mean_patch = out.patch_tokens.mean(dim=1)
        parts = {
            "pooled": [out.pooled],
            "mean_patch": [mean_patch],
            "pooled+mean_patch": [out.pooled, mean_patch],
            "patch_tokens": [out.patch_tokens.flatten(1)],
        }
        chunks.append(torch.cat(parts[mode], dim=1).float().cpu())
    encoder.train(was_training)
    return torch.cat(chunks).numpy()


def cached_features(
    encoder: Encoder,
    images: dict[str, torch.Tensor],
    dataset_key: str,
    mode: str = "pooled",
    cache_dir: str | Path | None = None,
    batch_size: int = 64,
    device: str = "cpu",
) -> dict[str, np.ndarray]:
    """Features per split ``{split: (N, D)}``, read from / written to the cache when ``cache_dir`` is set.

    ``dataset_key`` must identify the images (dataset, size, subset); the encoder part of the key
    is :func:`encoder_fingerprint`, so retrained or random-init weights never collide.
    """
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / encoder_fingerprint(encoder) / f"{dataset_key}-{mode}.npz"
        if path.is_file():
            with np.load(path) as stored:
                if set(stored.files) == set(images):
                    return {k: stored[k] for k in stored.files}
    feats = {split: extract_features(encoder, x, mode, batch_size, device) for split, x in images.items()}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, **feats)
        tmp.replace(path)
    return feats
