"""Multimodal masking of BM-MAE (Robinet et al. 2025) and MultiMAE (Bachmann et al., ECCV 2022).

The tokens of all modalities ``(B, M, N)`` share one visible budget ``n_visible``; per image, the
budget is split across the modalities by a Dirichlet draw, then each modality keeps that many of its
patches at random (MultiMAE's ``generate_random_masks``, reused by BM-MAE's ``bmmae/model.py``):

1. ``p ~ Dirichlet(alpha)`` over the modalities, redrawn while any ``p_m >= N / n_visible`` (a
   modality cannot give more than its ``N`` tokens; the references' rejection sampling);
2. ``n_m = round(p_m * n_visible)`` tokens selected in modality ``m``, at random from per-token noise;
3. the rounded counts need not sum to ``n_visible``: all tokens are ordered by
   ``(not selected) + u`` (``u ~ U(0, 1)``, one per token) and the first ``n_visible`` are kept, so
   surplus selections are dropped at random and a shortfall is filled by random unselected tokens.

Missing modalities (ssl_med's addition; the references pretrain on complete cases): the Dirichlet
runs over the modalities an image has (a Gamma draw per modality, the missing ones zeroed, then
normalised: exactly a Dirichlet over the present ones), and the tokens of a missing modality are
ordered after every present token, so they are never visible. With every modality present this is
the references' draw.

Every draw is an argument, so tests replay the references' algorithm on the same draws
(``tests/objectives/test_bm_mae_masking.py``). Deviation: kept indices are returned sorted (the
references keep them in shuffled order; for attention with position embeddings this changes nothing).
"""

from __future__ import annotations

import torch
from torch import Tensor


def visible_budget(present: Tensor, tokens_per_modality: int, mask_ratio: float) -> int:
    """The visible tokens per image: ``floor((1 - r) * M_min * N)`` with ``M_min`` the fewest modalities
    any image of the batch has (``present`` ``(B, M)`` bool), so every image can fill the budget and
    the batch stays rectangular; with complete images it is the references' ``int(M N (1 - r))``."""
    fewest = int(present.sum(dim=1).min())
    n_visible = int(fewest * tokens_per_modality * (1 - mask_ratio))
    if not 0 < n_visible <= fewest * tokens_per_modality:
        raise ValueError(f"mask_ratio={mask_ratio} keeps {n_visible} of {fewest * tokens_per_modality} tokens")
    return n_visible


def dirichlet_split(
    present: Tensor,
    n_visible: int,
    tokens_per_modality: int,
    alpha: float = 1.0,
    generator: torch.Generator | None = None,
    max_rounds: int = 1000,
) -> Tensor:
    """Budget proportions ``(B, M)`` (rows sum to 1, zero for missing modalities): a Dirichlet(``alpha``)
    over each image's present modalities, rows redrawn while a proportion is ``>= N / n_visible``."""
    b, m = present.shape
    max_prop = tokens_per_modality / n_visible
    props = torch.zeros(b, m, device=present.device)
    todo = torch.ones(b, dtype=torch.bool, device=present.device)
    concentration = torch.full((b, m), float(alpha))
    for _ in range(max_rounds):
        gamma = torch._standard_gamma(concentration, generator=generator).to(present.device)
        gamma = gamma * present
        draw = gamma / gamma.sum(dim=1, keepdim=True).clamp_min(1e-12)
        props = torch.where(todo[:, None], draw, props)
        todo = (props >= max_prop).any(dim=1)
        if not bool(todo.any()):
            return props
    raise RuntimeError(f"no Dirichlet split within {max_rounds} draws keeps every modality under {max_prop:.3f}")


def multimodal_masking(
    proportions: Tensor, modality_noise: Tensor, order_noise: Tensor, n_visible: int, present: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Visible tokens of the flattened modality-major sequence ``(B, M * N)`` (index ``m * N + n``).

    Args:
        proportions: ``(B, M)`` budget split (:func:`dirichlet_split`).
        modality_noise: ``(B, M, N)`` per-token noise choosing each modality's selected tokens.
        order_noise: ``(B, M * N)`` noise in ``[0, 1)`` breaking ties (which selections are kept).
        n_visible: kept tokens per image.
        present: ``(B, M)`` bool, missing modalities are never kept (default: all present).

    Returns:
        ``keep_idx`` ``(B, n_visible)`` ascending, and ``mask`` ``(B, M, N)`` bool (True = masked).
    """
    b, m, n = modality_noise.shape
    counts = (proportions * n_visible).round().long()  # (B, M), as the references
    # as the references: token j is selected when the index of the j-th lowest noise is below n_m
    # (a uniformly random subset of n_m tokens)
    unselected = (modality_noise.argsort(dim=2) >= counts[:, :, None]).to(order_noise.dtype)
    if present is not None:
        unselected = unselected + 2.0 * (~present.bool())[:, :, None].to(order_noise.dtype)
    order = unselected.reshape(b, m * n) + order_noise
    keep_idx = order.argsort(dim=1)[:, :n_visible].sort(dim=1).values
    mask = torch.ones(b, m * n, dtype=torch.bool, device=order.device)
    mask.scatter_(1, keep_idx, False)
    return keep_idx, mask.reshape(b, m, n)
