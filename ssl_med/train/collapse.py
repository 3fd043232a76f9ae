"""Collapse diagnostics of a batch of embeddings ``(B, D)``: spread, effective rank, and the log warning.

Two numbers, because they fail differently:

* :func:`embedding_std` — the mean per-dimension std of the L2-normalised embeddings (lightly's
  ``std_of_l2_normalized``): about ``1/sqrt(D)`` when the embeddings are spread over the sphere, 0 when
  they point one way. It is the cosine geometry a kNN read-out sees, and it is also near 0 when every
  embedding carries one large shared offset (common in MAE-style encoders' mean patch tokens) while the
  differences between images still span many dimensions;
* :func:`effective_rank` — RankMe (Garrido et al., "RankMe: Assessing the downstream performance of
  pretrained self-supervised representations by their rank", ICML 2023), computed on the *centred*
  embeddings: ``exp`` of the entropy of the normalised singular values, between 1 (every embedding is
  the same point, or they differ along one direction) and ``min(B, D)``. Shared offsets do not lower it;
  dimensional collapse does.

:class:`CollapseMonitor` warns only when both are low (a real collapse); a low spread with a healthy
rank is reported once at INFO level as an anisotropic, not a collapsed, representation.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

log = logging.getLogger(__name__)

#: centred embeddings whose norm is below this fraction of the raw embeddings' are one point (rank 1)
POINT_TOLERANCE = 1e-6


def embedding_std(embeddings: Tensor) -> Tensor:
    """Mean per-dimension std of L2-normalised embeddings ``(B, D)``.

    About ``1/sqrt(D)`` for well-spread embeddings, 0 when they collapse to one point or share one
    dominant direction.
    """
    z = torch.nn.functional.normalize(embeddings.float(), dim=1)
    return z.std(dim=0).mean()


def effective_rank(embeddings: Tensor) -> float:
    """RankMe of the centred embeddings ``(B, D)``: ``exp(-sum p_k log p_k)`` with ``p = s / sum(s)`` over the
    singular values ``s``; 1.0 when the embeddings are (numerically) one point."""
    x = embeddings.detach().double()
    centred = x - x.mean(dim=0, keepdim=True)
    if centred.norm() <= POINT_TOLERANCE * max(float(x.norm()), 1e-30):
        return 1.0
    s = torch.linalg.svdvals(centred)
    p = s / s.sum()
    p = p[p > 0]
    return float(torch.exp(-(p * p.log()).sum()))


class CollapseMonitor:
    """Warns in the log, once, when for ``patience`` consecutive logged steps (``trainer.log_every_n_steps``
    apart) the embedding spread stays below ``ratio`` of the ideal ``1/sqrt(D)`` **and** the effective
    rank stays below ``rank_ratio`` of ``min(B, D)``: a collapsed encoder maps every image to (nearly) one
    point, and only the curves would show it otherwise. A low spread alone is logged once at INFO level:
    the embeddings share one large direction but still differ along many (cosine kNN suffers, linear
    read-outs that standardise their features do not)."""

    def __init__(self, ratio: float = 0.1, rank_ratio: float = 0.05, patience: int = 5) -> None:
        self.ratio, self.rank_ratio, self.patience = ratio, rank_ratio, patience
        self.low_steps = 0
        self.warned = False
        self.noted_anisotropy = False

    def update(self, std: float, ideal: float, step: int, rank: float | None = None, max_rank: int | None = None) -> bool:
        """Record one step's ``collapse/embedding_std`` (and ``collapse/effective_rank`` out of ``max_rank``
        = ``min(B, D)``; without them the spread alone decides); returns True when it warns."""
        low_spread = std < self.ratio * ideal
        low_rank = rank is None or max_rank is None or rank < max(self.rank_ratio * max_rank, 1.5)
        if low_spread and not low_rank and not self.noted_anisotropy:
            self.noted_anisotropy = True
            log.info(
                "step %d: embedding std %.4f is below %.0f%% of the spread-out %.4f, but the embeddings span an "
                "effective rank of %.1f of %d: one large shared direction, not a collapse (cosine kNN on these "
                "features suffers; linear read-outs do not)",
                step, std, 100 * self.ratio, ideal, rank, max_rank,
            )
        self.low_steps = self.low_steps + 1 if low_spread and low_rank else 0
        if self.low_steps < self.patience or self.warned:
            return False
        self.warned = True
        rank_text = "" if rank is None else f" and effective rank {rank:.1f} of {max_rank}"
        log.warning(
            "embedding collapse at step %d: embedding std %.4f (below %.0f%% of the healthy %.4f)%s for %d logged "
            "steps; lower optim.lr, lengthen the warm-up, or check the objective's teacher/temperature settings",
            step, std, 100 * self.ratio, ideal, rank_text, self.patience,
        )
        return True
