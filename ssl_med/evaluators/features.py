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
import os
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import torch

from ssl_med.encoder import Encoder, EncoderOutput

#: read-out name -> ``EncoderOutput`` -> ``(B, D_mode)`` features
READOUTS: dict[str, Callable[[EncoderOutput], torch.Tensor]] = {
    "pooled": lambda out: out.pooled,
    "pooled+mean_patch": lambda out: torch.cat([out.pooled, out.patch_tokens.mean(dim=1)], dim=1),
    "mean_patch": lambda out: out.patch_tokens.mean(dim=1),
    "patch_tokens": lambda out: out.patch_tokens.flatten(1),
}
FEATURE_MODES = tuple(READOUTS)


def encoder_fingerprint(encoder: Encoder) -> str:
    """16-hex-digit SHA-256 of the encoder's class and state dict (names, shapes, values)."""
    digest = hashlib.sha256(type(encoder).__qualname__.encode())
    for name, tensor in sorted(encoder.state_dict().items()):
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().cpu().contiguous().float().numpy().tobytes())
    return digest.hexdigest()[:16]


@torch.no_grad()
def extract_readouts(
    encoder: Encoder, images: torch.Tensor, modes: Sequence[str], batch_size: int = 64, device: str = "cpu"
) -> dict[str, np.ndarray]:
    """``images`` ``(N, C, *S)`` -> ``{mode: (N, D_mode) float32}`` for every read-out in ``modes`` (see the
    module docstring), from one forward pass per batch."""
    unknown = [m for m in modes if m not in FEATURE_MODES]
    if unknown:
        raise ValueError(f"unknown feature mode(s) {unknown}; choose from {FEATURE_MODES}")
    was_training = encoder.training
    encoder.eval().to(device)
    chunks: dict[str, list[torch.Tensor]] = {m: [] for m in modes}
    for start in range(0, len(images), batch_size):
        out = encoder(images[start : start + batch_size].to(device))
        for mode in modes:
            chunks[mode].append(READOUTS[mode](out).float().cpu())
    encoder.train(was_training)
    return {m: torch.cat(c).numpy() for m, c in chunks.items()}


def extract_features(
    encoder: Encoder, images: torch.Tensor, mode: str = "pooled", batch_size: int = 64, device: str = "cpu"
) -> np.ndarray:
    """``images`` ``(N, C, *S)`` -> features ``(N, D)``, ``(N, 2D)`` or ``(N, P * D)`` float32 (see the module
    docstring)."""
    return extract_readouts(encoder, images, [mode], batch_size, device)[mode]


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
    return cached_readouts(encoder, images, dataset_key, [mode], cache_dir, batch_size, device)[mode]


def cached_readouts(
    encoder: Encoder,
    images: dict[str, torch.Tensor],
    dataset_key: str,
    modes: Sequence[str],
    cache_dir: str | Path | None = None,
    batch_size: int = 64,
    device: str = "cpu",
) -> dict[str, dict[str, np.ndarray]]:
    """:func:`cached_features` for several read-outs ``{mode: {split: (N, D_mode)}}``; the ones not
    cached yet come from one forward pass over each split."""
    out: dict[str, dict[str, np.ndarray]] = {}
    paths: dict[str, Path] = {}
    if cache_dir is not None:
        folder = Path(cache_dir) / encoder_fingerprint(encoder)
        for mode in modes:
            paths[mode] = folder / f"{dataset_key}-{mode}.npz"
            if paths[mode].is_file():
                with np.load(paths[mode]) as stored:
                    if set(stored.files) == set(images):
                        out[mode] = {k: stored[k] for k in stored.files}
    missing = [m for m in modes if m not in out]
    if not missing:
        return out
    per_split = {split: extract_readouts(encoder, x, missing, batch_size, device) for split, x in images.items()}
    for mode in missing:
        out[mode] = {split: feats[mode] for split, feats in per_split.items()}
        if mode in paths:
            paths[mode].parent.mkdir(parents=True, exist_ok=True)
            tmp = paths[mode].with_suffix(f".tmp{os.getpid()}.npz")  # evaluations running at once write their own
            np.savez(tmp, **out[mode])
            tmp.replace(paths[mode])
    return out
