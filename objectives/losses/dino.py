"""DINO / iBOT / KoLeo losses and teacher-target normalisation (DINOv2 semantics), DDP-aware.

Notation: ``K`` prototypes, ``B`` images per view, ``tau_s`` / ``tau_t`` student / teacher temperatures,
``CE(p, s) = -sum_k p_k log_softmax(s / tau_s)_k``.

* :func:`dino_cross_view_loss` -- DINO CLS loss averaged over all (student view, teacher view) pairs
  that are not the same global view (DINOv2's ``L_loc + L_glob`` bookkeeping, ``/ T`` with
  ``T = G (G - 1) + G L``).
* :func:`ibot_patch_loss` -- masked-patch CE, normalised per image (``1 / |M_b|``) then divided by the
  number of images (images without masked patches count in the denominator).
* :func:`koleo_loss` -- Kozachenko-Leonenko entropy estimator on L2-normalised embeddings.
* :func:`softmax_center`, :func:`update_center`, :func:`sinkhorn_knopp` -- teacher targets.

Every cross-rank reduction goes through :func:`all_reduce_sum` / :func:`all_reduce_max`, which are
no-ops when ``torch.distributed`` is not initialised.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(x: Tensor) -> Tensor:
    """In-place sum over ranks (no-op outside DDP); returns ``x``."""
    if _distributed():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_reduce_max(x: Tensor) -> Tensor:
    """In-place max over ranks (no-op outside DDP); returns ``x``."""
    if _distributed():
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


# -- teacher targets ------------------------------------------------------------------------------
def softmax_center(teacher_logits: Tensor, center: Tensor, teacher_temp: float) -> Tensor:
    """Centered, sharpened teacher probabilities ``softmax((t - c) / tau_t)``.

    Shapes: ``teacher_logits (..., K)``, ``center (1, K)`` -> ``(..., K)``.
    """
    return F.softmax((teacher_logits.float() - center) / teacher_temp, dim=-1)


@torch.no_grad()
def update_center(center: Tensor, teacher_logits: Tensor, momentum: float) -> bool:
    """EMA update of ``center (1, K)`` in place with the mean of ``teacher_logits (M, K)`` over all ranks.

    ``c <- m c + (1 - m) mean(t)``. The mean is ``sum over ranks / count over ranks``, so ranks
    with ``M = 0`` (no masked patch) still take part in the reduction. Returns False (and leaves
    ``center`` unchanged) when the global count is zero.
    """
    stats = torch.cat(
        [teacher_logits.float().sum(dim=0), teacher_logits.new_tensor([teacher_logits.shape[0]], dtype=torch.float32)]
    )
    all_reduce_sum(stats)
    count = float(stats[-1])
    if count == 0:
        return False
    center.mul_(momentum).add_(stats[:-1].unsqueeze(0) / count, alpha=1.0 - momentum)
    return True


@torch.no_grad()
def sinkhorn_knopp(teacher_logits: Tensor, teacher_temp: float, n_iterations: int = 3) -> Tensor:
    """Sinkhorn-Knopp teacher targets (SwAV / DINOv2): balanced soft assignments to prototypes.

    ``Q = exp(t / tau_t)^T`` ``(K, B_total)`` normalised to total mass 1, then ``n_iterations`` times:
    every prototype row to mass ``1 / K``, every sample column to mass ``1 / B_total``; finally scaled
    by ``B_total`` so each sample's row of the result sums to 1. ``B_total`` and all sums are taken
    over ranks.

    Deviation: the global maximum logit is subtracted before ``exp`` (a constant factor that the first
    normalisation cancels), so large ``t / tau_t`` cannot overflow.

    Shapes: ``teacher_logits (B, K)`` -> ``(B, K)`` float32. ``B = 0`` on a rank is allowed.
    """
    logits = teacher_logits.float() / teacher_temp
    k = logits.shape[1]
    # global max for stability (-inf when this rank has no rows)
    peak = logits.max() if logits.numel() else logits.new_tensor(float("-inf"))
    peak = all_reduce_max(peak.reshape(1).clone())
    q = torch.exp(logits - peak).t()  # (K, B)
    b_total = all_reduce_sum(logits.new_tensor([logits.shape[0]]))
    if float(b_total) == 0:
        return teacher_logits.new_zeros(teacher_logits.shape, dtype=torch.float32)
    total = all_reduce_sum(q.sum().reshape(1))
    q = q / total
    for _ in range(n_iterations):
        rows = all_reduce_sum(q.sum(dim=1, keepdim=True))  # (K, 1)
        q = q / rows / k
        q = q / q.sum(dim=0, keepdim=True) / b_total  # columns are local to each rank
    return (q * b_total).t()


# -- losses ---------------------------------------------------------------------------------------
def cross_entropy(teacher_probs: Tensor, student_logits: Tensor, student_temp: float) -> Tensor:
    """Per-row ``CE(p_t, s) = -sum_k p_k log_softmax(s / tau_s)_k``: ``(..., K), (..., K) -> (...)``."""
    return -(teacher_probs * F.log_softmax(student_logits.float() / student_temp, dim=-1)).sum(dim=-1)


def dino_cross_view_loss(teacher_probs: Tensor, student_logits: Tensor, student_temp: float) -> tuple[Tensor, Tensor]:
    """DINO CLS loss over all cross-view pairs.

    Args:
        teacher_probs: ``(G, B, K)`` teacher targets of the ``G`` global views.
        student_logits: ``(V, B, K)`` student head outputs; views ``0..G-1`` are the same global views
            as the teacher's (never paired with themselves), views ``G..V-1`` are local crops.
        student_temp: ``tau_s``.

    Returns:
        ``(global_part, local_part)``: sums over the (student global g', teacher global g != g') and
        (student local, teacher global) pairs of the batch-mean CE, each divided by the number of
        pairs ``T = G (G - 1) + G (V - G)``. Their sum is the DINO loss.
    """
    g, v = teacher_probs.shape[0], student_logits.shape[0]
    n_pairs = g * (g - 1) + g * (v - g)
    if n_pairs == 0:
        raise ValueError("the DINO loss needs at least two views")
    zero = student_logits.new_zeros((), dtype=torch.float32)
    global_part, local_part = zero, zero
    for iv in range(v):
        for ig in range(g):
            if iv == ig:
                continue
            term = cross_entropy(teacher_probs[ig], student_logits[iv], student_temp).mean()
            if iv < g:
                global_part = global_part + term
            else:
                local_part = local_part + term
    return global_part / n_pairs, local_part / n_pairs


def ibot_patch_loss(teacher_probs: Tensor, student_logits: Tensor, masks: Tensor, student_temp: float) -> Tensor:
    """iBOT masked-patch loss with DINOv2's per-image normalisation.

    ``L = (1 / n) sum_b (1 / |M_b|) sum_{p in M_b} CE(p_t(b, p), s(b, p))``; images with no masked
    patch add 0 but count in ``n``.

    Args:
        teacher_probs, student_logits: ``(M, K)`` for the masked patches, in the order of
            ``masks.nonzero()`` (row-major over ``(image, patch)``), ``M = masks.sum()``.
        masks: ``(n, N)`` bool.
        student_temp: ``tau_s``.
    """
    n = masks.shape[0]
    if n == 0:
        return student_logits.new_zeros((), dtype=torch.float32)
    counts = masks.sum(dim=1).clamp_min(1).to(torch.float32)  # (n,)
    weights = (1.0 / counts).unsqueeze(1).expand_as(masks)[masks]  # (M,)
    loss = cross_entropy(teacher_probs, student_logits, student_temp)
    return (loss * weights).sum() / n


def koleo_loss(x: Tensor, eps: float = 1e-8) -> Tensor:
    """KoLeo regulariser ``-mean_i log(d_i + eps)``, ``d_i`` the distance of ``x_i`` to its nearest neighbour.

    As DINOv2: rows are L2-normalised, the neighbour is the argmax of the cosine similarity with the
    diagonal excluded, the distance is ``|| z_i - z_nn + eps ||_2`` (``nn.PairwiseDistance``), computed
    in float32 outside autocast. Duplicate rows give a large finite value (``-log(eps sqrt(D) + eps)``).

    Deviation: a batch of fewer than two rows has no neighbour; the loss is then 0 (the reference
    pairs the row with itself and returns ``-log(eps sqrt(D) + eps)``).

    Shapes: ``x (B, D)`` -> scalar.
    """
    if x.shape[0] < 2:
        return x.new_zeros((), dtype=torch.float32)
    with torch.autocast(device_type=x.device.type, enabled=False):
        z = F.normalize(x.float(), p=2, dim=-1, eps=eps)
        with torch.no_grad():
            sims = z @ z.t()
            sims.fill_diagonal_(-1.0)
            nn_idx = sims.argmax(dim=1)
        distances = F.pairwise_distance(z, z[nn_idx], p=2, eps=eps)
        return -torch.log(distances + eps).mean()
