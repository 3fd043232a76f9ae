"""Token orders for multi-directional scans over a patch grid (Vision Mamba's bidirectional scan,
SegMamba's tri-orientated 3D scan), and the index tables that spread a sequence into K orders and
merge K outputs back in one gather each (:class:`OrderIndex`), as used by :mod:`backbones.mamba`.

An order is a string of axis letters from slowest to fastest (2D ``h, w``; 3D ``d, h, w``) with an
optional ``_rev`` suffix for the reversed sequence, e.g. ``"dhw"``, ``"hwd"``, ``"hw_rev"``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from ssl_med.encoder import TokenLayout

#: the axis letters of a 2D / 3D grid, slowest first
AXES = {2: "hw", 3: "dhw"}
#: the default scan orders: Vim v2 (2D), SegMamba (3D)
DEFAULT_ORDERS = {2: ("hw", "hw_rev"), 3: ("dhw", "dhw_rev", "hwd")}


def parse_order(order: str, spatial_dims: int) -> tuple[str, bool]:
    """``"dhw_rev"`` -> (``"dhw"``, reversed=True); validates that the letters permute the axes."""
    axes, rev = (order[:-4], True) if order.endswith("_rev") else (order, False)
    if sorted(axes) != sorted(AXES[spatial_dims]):
        raise ValueError(
            f"scan order {order!r} must list the axes {AXES[spatial_dims]!r} (slowest first), "
            "optionally with '_rev'"
        )
    return axes, rev


def grid_rank(grid: Sequence[int], axes: str) -> Tensor:
    """``(N,)`` position of each raster-numbered grid token in the scan over ``axes`` (slowest first)."""
    names = AXES[len(grid)]
    index = torch.arange(math.prod(grid)).reshape(tuple(grid))
    perm = [names.index(a) for a in axes]
    order = index.permute(perm).reshape(-1)  # raster ids listed in scan order
    return torch.argsort(order)


def sequence_order(order: str, layout: TokenLayout, batch: int, device: torch.device) -> Tensor:
    """Permutation of the mixed sequence (prefix + patch tokens) visiting it in ``order``.

    Args:
        order: e.g. ``"hw"``, ``"dhw_rev"``.
        layout: the encoder's token layout (grid, kept indices, prefix positions).
        batch: B.
        device: where to put the result.

    Returns:
        ``(B, L)`` long: ``seq_in_order = seq.gather(1, perm)``; ``L = P + N_keep``.
    """
    axes, rev = parse_order(order, len(layout.grid))
    rank = grid_rank(layout.grid, axes).to(device)
    if layout.keep_idx is None:
        patch_order = torch.argsort(rank).expand(batch, -1)  # sequence index of the k-th visited patch
    else:
        patch_order = torch.argsort(rank[layout.keep_idx], dim=1)
    prefix = layout.prefix_positions
    if prefix:  # patch j sits at sequence index j (before the prefix) or j + P (after it)
        at = prefix[0]
        seq_index = patch_order + len(prefix) * (patch_order >= at)
        pre = torch.tensor(prefix, device=device).expand(batch, -1)
        perm = torch.cat([seq_index[:, :at], pre, seq_index[:, at:]], dim=1)
    else:
        perm = patch_order
    return perm.flip(1) if rev else perm


def is_sequence_order(order: str, layout: TokenLayout) -> bool:
    """Whether ``order`` visits the mixed sequence as it is laid out (:func:`sequence_order` would be
    ``arange(L)``): the raster order, not reversed, over the full grid (no ``keep_idx``), with the
    prefix tokens in one run (as :func:`sequence_order` places them)."""
    axes, rev = parse_order(order, len(layout.grid))
    prefix = layout.prefix_positions
    one_run = not prefix or tuple(prefix) == tuple(range(prefix[0], prefix[0] + len(prefix)))
    return axes == AXES[len(layout.grid)] and not rev and layout.keep_idx is None and one_run


def invert(perm: Tensor) -> Tensor:
    """Inverse of a ``(B, L)`` permutation: ``x.gather(1, perm).gather(1, invert(perm)) == x``."""
    return torch.argsort(perm, dim=1)


class _SelectSum(torch.autograd.Function):
    """Rows of ``x`` ``(R, C)`` selected by ``index`` and summed over runs of ``group`` consecutive picks;
    the backward is the same operation with ``back_index`` and ``back_group``.

    Spreading the sequence into K scan orders and merging the K outputs back are adjoint pairs of
    this form (:class:`OrderIndex`): each forward is one ``index_select``, and so is each backward,
    where autograd's backward of indexing would be a serial scatter-add into zeros. Only the index
    is saved, not ``x``.
    """

    @staticmethod
    def forward(ctx, x: Tensor, index: Tensor, group: int, back_index: Tensor, back_group: int) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(back_index)
        ctx.back_group = back_group
        return _select_sum(x, index, group)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        (back_index,) = ctx.saved_tensors
        return _select_sum(grad, back_index, ctx.back_group), None, None, None, None


def _select_sum(x: Tensor, index: Tensor, group: int) -> Tensor:
    """``x`` ``(R, C)`` -> ``x[index]`` summed over runs of ``group`` rows, ``(len(index) / group, C)``."""
    out = x.index_select(0, index)
    return out if group == 1 else out.view(-1, group, x.shape[-1]).sum(1)


class OrderIndex:
    """Row indices that spread a sequence into K scan orders at once and merge the K outputs back.

    With ``P[b, t, k]`` the sequence index order ``k`` visits at step ``t`` and ``Q`` its inverse
    (``Q[b, s, k]``: the step at which order ``k`` visits ``s``):

    * spread: ``xz`` ``(B, L, 2, E)`` (x and gate z) -> ``(B, L, 2, K, E)``, entry ``(b, t, p, k)`` =
      ``xz[b, P[b, t, k], p]``; its adjoint sums ``g[b, Q[b, s, k], p, k]`` over ``k``.
    * merge: ``y`` ``(B, L, K, E)`` (order ``k``'s output at its step ``t``) -> ``(B, L, E)``, the sum
      over ``k`` of ``y[b, Q[b, s, k], k]``; its adjoint is ``g[b, P[b, t, k]]``.

    Args:
        orders: one ``(B, L)`` permutation per order, ``None`` for the sequence's own order.
        inverses: their inverses (``None`` where the order is ``None``).
        batch, length: B and L.
        device: where the indices live.
    """

    def __init__(
        self,
        orders: Sequence[Tensor | None],
        inverses: Sequence[Tensor | None],
        batch: int,
        length: int,
        device: torch.device,
    ) -> None:
        ident = torch.arange(length, device=device).expand(batch, -1)
        perm = torch.stack([ident if p is None else p for p in orders], dim=-1)  # (B, L, K)
        inv = torch.stack([ident if q is None else q for q in inverses], dim=-1)
        self.orders = k = perm.shape[-1]
        base = length * torch.arange(batch, device=device)[:, None, None]  # (B, 1, 1)
        part = torch.arange(2, device=device)[:, None]  # (2, 1): x, z
        order = torch.arange(k, device=device)
        src, back = perm + base, inv + base  # (B, L, K) rows of a (B * L, ...) table
        self.spread = (2 * src[:, :, None, :] + part).reshape(-1)  # (b, t, p, k) -> row of (B L 2, E)
        self.spread_back = ((2 * back[:, :, None, :] + part) * k + order).reshape(-1)  # of (B L 2 K, E)
        self.merge = (back * k + order).reshape(-1)  # (b, s, k) -> row of (B L K, E)
        self.merge_back = src.reshape(-1)  # (b, t, k) -> row of (B L, E)

    def spread_xz(self, xz: Tensor) -> tuple[Tensor, Tensor]:
        """``xz`` ``(B, L, 2E)`` -> x and z ``(B, K E, L)`` each, token-major, order ``k`` in channels
        ``k E .. (k + 1) E`` and its step ``t`` at position ``t``."""
        batch, length, width = xz.shape
        e = width // 2
        seqs = _SelectSum.apply(xz.reshape(-1, e), self.spread, 1, self.spread_back, self.orders)
        seqs = seqs.view(batch, length, 2, self.orders * e)
        return seqs[:, :, 0].transpose(1, 2), seqs[:, :, 1].transpose(1, 2)

    def merge_outputs(self, y: Tensor) -> Tensor:
        """``y`` ``(B, L, K E)`` (order ``k``'s step ``t``) -> ``(B, L, E)``, summed over orders in
        sequence order."""
        batch, length, width = y.shape
        e = width // self.orders
        out = _SelectSum.apply(y.reshape(-1, e), self.merge, self.orders, self.merge_back, 1)
        return out.view(batch, length, e)
