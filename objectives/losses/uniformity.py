"""U-MAE's uniformity regulariser against dimensional collapse (Zhang, Wang and Wang, "How Mask Matters:
Towards Theoretical Understandings of Masked Autoencoders", NeurIPS 2022; ``zhangq327/U-MAE``, ``uni_reg.py``).

MAE's reconstruction loss lets the encoder's embeddings shrink into a few directions (dimensional
collapse); the paper adds the spectral-contrastive "negative" term of HaoChen et al. (NeurIPS 2021) on the
encoder's embeddings of the visible patches. For a batch of embeddings ``z`` ``(B, D)``, each scaled to unit
length (``ẑ``)::

    uniformity = 1/B² sum_{i,j} (ẑ_i · ẑ_j)²  =  tr(S²),   S = 1/B sum_i ẑ_i ẑ_iᵀ   (tr S = 1)

It is 1 when every embedding points the same way and falls to its minimum ``1/min(B, D)`` when the
second moment ``S`` is isotropic, so minimising it spreads the embeddings' energy over every direction.
The reference divides the similarities by a temperature ``τ = 0.1`` and weights the term by ``1e-4``:
weight ``1e-4 / τ² = 0.01`` on the form above. The pairs include ``i = j`` as the reference's do (a
constant ``1/B`` that carries no gradient). Statistics are over the local batch (the reference all-gathers
the embeddings across GPUs); half-precision inputs are upcast to float32, outside autocast.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from objectives.losses.precision import upcast


def spectral_uniformity(embeddings: Tensor) -> Tensor:
    """``tr(S²)`` of the unit-length ``embeddings`` ``(B, D)``, ``B >= 2`` (see the module docstring)."""
    if embeddings.ndim != 2 or embeddings.shape[0] < 2:
        raise ValueError(f"expected (B, D) embeddings with B >= 2, got {tuple(embeddings.shape)}")
    with torch.autocast(device_type=embeddings.device.type, enabled=False):  # the Gram matrix in float32
        z = F.normalize(upcast(embeddings), dim=-1)
        return (z @ z.T).pow(2).mean()
