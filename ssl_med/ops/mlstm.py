"""The mLSTM cell (xLSTM's matrix-memory LSTM) in three mathematically equal forms, plain PyTorch.

Per head, with ``q_t, k_t in R^DH``, ``v_t in R^DV`` and scalar gate pre-activations ``i~_t``
(exponential input gate) and ``f~_t`` (sigmoid forget gate, used as ``log f_t = logsigmoid(f~_t)``)::

    C_t = f_t C_{t-1} + i_t k'_t v_t^T        k'_t = k_t / sqrt(DH)       (DH x DV matrix memory)
    n_t = f_t n_{t-1} + i_t k'_t                                          (normaliser state)
    h_t = C_t^T q_t / max(|n_t . q_t|, 1)

Every form carries a stabiliser ``m`` (a running log-scale) so that no ``exp`` of a gate is taken
unstabilised: the stored states are ``C_t exp(-m_t)`` and ``n_t exp(-m_t)``, and the output is
``h_t = q_t^T C~_t / (max(|q_t^T n~_t|, exp(-m_t)) + eps)`` with ``eps = 1e-6`` added *after* the max,
as in the reference (NX-AI/xlstm ``backends.py``, NX-AI/mlstm_kernels). Without ``eps`` the output does
not depend on the choice of ``m``; with it, forms that choose ``m`` differently differ by ``O(eps)``:

* :func:`mlstm_parallel` — quadratic, attention-like; ``m_t`` is the row maximum of the log decay
  matrix (the reference's ``parallel_stabilized_simple``). ``O(L^2)`` memory.
* :func:`mlstm_chunkwise` — linear in ``L``: parallel inside chunks of ``chunk_size`` tokens, a
  recurrence over chunk states between them; lengths that are not a multiple of the chunk are padded
  at the end (causal, so padding cannot change earlier outputs) and cropped. Its ``m_t`` equals the
  recurrent form's exactly (initial ``m_0 = 0``), so chunkwise and recurrent agree to float error even
  with ``eps``.
* :func:`mlstm_recurrent` / :func:`mlstm_recurrent_step` — one step at a time (the test reference;
  also what a streaming decoder would use).

All functions take ``q, k: (B, NH, L, DH)``, ``v: (B, NH, L, DV)``, gate pre-activations
``(B, NH, L)`` (a trailing singleton axis, the reference's ``(B, NH, L, 1)``, is accepted too), and
return ``h: (B, NH, L, DV)``. They are differentiable by autograd. No fused kernel is used: the
maintained one (``mlstm_kernels``, Triton) needs a GPU and is not a dependency of this package.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

MLSTMImpl = Literal["auto", "parallel", "chunkwise", "recurrent"]
MLSTMState = tuple[Tensor, Tensor, Tensor]

#: The reference's eps, added after ``max(|n.q|, exp(-m))``.
EPS = 1e-6


def _gate(x: Tensor, q: Tensor) -> Tensor:
    """Gate pre-activations as ``(B, NH, L)``; accepts the reference's ``(B, NH, L, 1)``."""
    if x.ndim == q.ndim and x.shape[-1] == 1:
        x = x.squeeze(-1)
    if x.shape != q.shape[:-1]:
        raise ValueError(
            f"gate pre-activations must be (B, NH, L) = {tuple(q.shape[:-1])}, got {tuple(x.shape)}"
        )
    return x


def _check(q: Tensor, k: Tensor, v: Tensor) -> None:
    if q.ndim != 4 or k.shape != q.shape or v.shape[:-1] != q.shape[:-1]:
        raise ValueError(
            f"expected q, k (B, NH, L, DH) and v (B, NH, L, DV), got {tuple(q.shape)}, {tuple(k.shape)}, "
            f"{tuple(v.shape)}"
        )


def mlstm_parallel(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    igate_preact: Tensor,
    fgate_preact: Tensor,
    *,
    eps: float = EPS,
    stabilize_rowwise: bool = True,
) -> Tensor:
    """Parallel (quadratic) stabilised mLSTM, the reference's ``parallel_stabilized_simple``.

    ``F = [0, cumsum(log f)]``; ``log D[t, j] = F[t+1] - F[j+1] + i~_j`` for ``j <= t`` (``-inf`` above
    the diagonal; the forget gate of step ``j`` does not act on input ``j``); ``m_t = max_j log D[t, j]``
    (or one maximum per head with ``stabilize_rowwise=False``); ``S = (q k^T / sqrt(DH)) * exp(log D - m)``;
    ``h = S / (max(|S 1|, exp(-m)) + eps) @ v``.

    Args:
        q, k: ``(B, NH, L, DH)``.
        v: ``(B, NH, L, DV)``.
        igate_preact, fgate_preact: ``(B, NH, L)``.
        eps: added after the max in the normaliser.
        stabilize_rowwise: row-wise stabiliser (reference default) or one per ``(batch, head)``.

    Returns:
        ``(B, NH, L, DV)``. Memory ``O(B NH L^2)``.
    """
    _check(q, k, v)
    i_pre, f_pre = _gate(igate_preact, q), _gate(fgate_preact, q)
    length, dh = q.shape[-2], q.shape[-1]
    log_f = F.logsigmoid(f_pre)
    cum = torch.cat([log_f.new_zeros(*log_f.shape[:-1], 1), log_f.cumsum(-1)], dim=-1)  # (B, NH, L+1)
    log_fg = cum[..., 1:, None] - cum[..., None, 1:]  # (B, NH, L, L): sum_{s=j+1..t} log f_s
    causal = torch.ones(length, length, dtype=torch.bool, device=q.device).tril()
    log_d = torch.where(causal, log_fg, float("-inf")) + i_pre[..., None, :]
    # row-wise (B, NH, L, 1) or one per head (B, NH, 1, 1)
    m = log_d.amax(dim=-1 if stabilize_rowwise else (-2, -1), keepdim=True)
    scores = (q @ (k * dh**-0.5).transpose(-2, -1)) * torch.exp(log_d - m)
    normaliser = torch.maximum(scores.sum(dim=-1, keepdim=True).abs(), torch.exp(-m))
    return (scores / (normaliser + eps)) @ v


# over 80 lines with its derivation in the docstring; the body (~55 lines) is one kernel's three stages
def mlstm_chunkwise(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    igate_preact: Tensor,
    fgate_preact: Tensor,
    *,
    chunk_size: int = 64,
    eps: float = EPS,
) -> Tensor:
    """Chunkwise stabilised mLSTM: linear time and memory in ``L`` (NX-AI/mlstm_kernels' native form).

    Tokens are split into ``NC = ceil(L / chunk_size)`` chunks (the tail is padded at the end and the
    padded outputs dropped). Inside chunk ``c`` with in-chunk log-forget cumsum ``b``, total decay
    ``g = b[-1]`` and ``a_j = g - b_j + i~_j``, the states at chunk boundaries follow (``m_0 = 0``)::

        m_{c+1} = max(g + m_c, max_j a_j)
        C_{c+1} = exp(g + m_c - m_{c+1}) C_c + sum_j exp(a_j - m_{c+1}) k'_j v_j^T      (n likewise)

    and the outputs combine the state of the previous chunk with the in-chunk parallel form, with
    ``m_t = max(b_t + m_c, max_{j<=t} (b_t - b_j + i~_j))`` (equal to the recurrent form's ``m_t``)::

        h_t = [e^{b_t + m_c - m_t} q_t^T C_c + sum_j e^{b_t - b_j + i~_j - m_t} (q_t.k'_j) v_j]
              / (max(|same with n_c and 1 in place of v_j|, exp(-m_t)) + eps)

    The per-chunk sums ``sum_j k'_j v_j^T`` are formed for all chunks at once with a local stabiliser
    ``max_j a_j``; only the cheap rescale-and-add runs as a Python loop over chunks.

    Args:
        q, k: ``(B, NH, L, DH)``.
        v: ``(B, NH, L, DV)``.
        igate_preact, fgate_preact: ``(B, NH, L)``.
        chunk_size: tokens per chunk (clipped to ``L``); any ``L`` is allowed.
        eps: added after the max in the normaliser.

    Returns:
        ``(B, NH, L, DV)``. Memory ``O(B NH (L chunk_size + NC DH DV))``.
    """
    _check(q, k, v)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    i_pre, f_pre = _gate(igate_preact, q), _gate(fgate_preact, q)
    b_, nh, length, dh = q.shape
    dv = v.shape[-1]
    cs = min(chunk_size, length)
    pad = (-length) % cs
    log_f = F.logsigmoid(f_pre)
    k = k * dh**-0.5
    if pad:  # at the end: causal, so it cannot affect the kept outputs
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        log_f, i_pre = F.pad(log_f, (0, pad)), F.pad(i_pre, (0, pad))
    nc = (length + pad) // cs
    qc, kc, vc = q.reshape(b_, nh, nc, cs, dh), k.reshape(b_, nh, nc, cs, dh), v.reshape(b_, nh, nc, cs, dv)
    ic = i_pre.reshape(b_, nh, nc, cs)
    b = log_f.reshape(b_, nh, nc, cs).cumsum(-1)  # (B, NH, NC, cs)
    g = b[..., -1]  # (B, NH, NC)

    # -- states at chunk boundaries ------------------------------------------------------------
    a = g[..., None] - b + ic  # (B, NH, NC, cs)
    a_max = a.amax(dim=-1)  # (B, NH, NC)
    w = torch.exp(a - a_max[..., None])
    kw = kc * w[..., None]
    c_local = kw.transpose(-2, -1) @ vc  # (B, NH, NC, DH, DV), scaled by exp(-a_max)
    n_local = kw.sum(dim=-2)  # (B, NH, NC, DH)
    c_state = q.new_zeros(b_, nh, dh, dv)
    n_state = q.new_zeros(b_, nh, dh)
    m_state = q.new_zeros(b_, nh)
    c_prev, n_prev, m_prev = [], [], []
    # unbind once: indexing c_local[:, :, c] per chunk makes autograd zero-fill and add a tensor of the
    # full (B, NH, NC, DH, DV) size for every chunk in backward; unbind's backward stacks the slices once
    c_loc, n_loc, g_c, a_c = c_local.unbind(2), n_local.unbind(2), g.unbind(-1), a_max.unbind(-1)
    for c in range(nc):
        c_prev.append(c_state)
        n_prev.append(n_state)
        m_prev.append(m_state)
        if c == nc - 1:
            break
        m_next = torch.maximum(g_c[c] + m_state, a_c[c])
        decay = torch.exp(g_c[c] + m_state - m_next)
        scale = torch.exp(a_c[c] - m_next)
        c_state = decay[..., None, None] * c_state + scale[..., None, None] * c_loc[c]
        n_state = decay[..., None] * n_state + scale[..., None] * n_loc[c]
        m_state = m_next
    c_before = torch.stack(c_prev, dim=2)  # (B, NH, NC, DH, DV)
    n_before = torch.stack(n_prev, dim=2)  # (B, NH, NC, DH)
    m_before = torch.stack(m_prev, dim=2)  # (B, NH, NC)

    # -- outputs: previous-chunk state + in-chunk parallel form -----------------------------------
    causal = torch.ones(cs, cs, dtype=torch.bool, device=q.device).tril()
    log_d = torch.where(causal, b[..., :, None] - b[..., None, :], float("-inf")) + ic[..., None, :]
    m_intra = log_d.amax(dim=-1)  # (B, NH, NC, cs)
    m_inter = b + m_before[..., None]  # (B, NH, NC, cs)
    m = torch.maximum(m_inter, m_intra)
    scores = (qc @ kc.transpose(-2, -1)) * torch.exp(log_d - m[..., None])  # (B, NH, NC, cs, cs)
    q_inter = qc * torch.exp(m_inter - m)[..., None]
    num = q_inter @ c_before + scores @ vc  # (B, NH, NC, cs, DV)
    den = (q_inter @ n_before[..., None]).squeeze(-1) + scores.sum(dim=-1)  # (B, NH, NC, cs)
    h = num / (torch.maximum(den.abs(), torch.exp(-m)) + eps)[..., None]
    return h.reshape(b_, nh, nc * cs, dv)[:, :, :length]


def mlstm_initial_state(q: Tensor, v: Tensor) -> MLSTMState:
    """Zero state ``(C (B, NH, DH, DV), n (B, NH, DH), m (B, NH))`` for ``q (B, NH, *, DH)``, ``v (B, NH, *, DV)``."""
    b, nh, dh, dv = q.shape[0], q.shape[1], q.shape[-1], v.shape[-1]
    return q.new_zeros(b, nh, dh, dv), q.new_zeros(b, nh, dh), q.new_zeros(b, nh)


def mlstm_recurrent_step(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    igate_preact: Tensor,
    fgate_preact: Tensor,
    state: MLSTMState,
    *,
    eps: float = EPS,
) -> tuple[Tensor, MLSTMState]:
    """One stabilised mLSTM step (the reference's ``recurrent_step_stabilized_simple``).

    ``m_t = max(log f_t + m_{t-1}, i~_t)``; ``f' = exp(log f_t + m_{t-1} - m_t)``, ``i' = exp(i~_t - m_t)``;
    ``C_t = f' C_{t-1} + i' k'_t v_t^T``; ``n_t = f' n_{t-1} + i' k'_t``;
    ``h_t = q_t^T C_t / (max(|q_t^T n_t|, exp(-m_t)) + eps)``.

    Args:
        q, k: ``(B, NH, DH)``; v: ``(B, NH, DV)``; igate_preact, fgate_preact: ``(B, NH)``.
        state: ``(C (B, NH, DH, DV), n (B, NH, DH), m (B, NH))``, see :func:`mlstm_initial_state`.

    Returns:
        ``h_t (B, NH, DV)`` and the new state.
    """
    c_state, n_state, m_state = state
    log_f = F.logsigmoid(fgate_preact)
    m_new = torch.maximum(log_f + m_state, igate_preact)
    f_act = torch.exp(log_f + m_state - m_new)
    i_act = torch.exp(igate_preact - m_new)
    k = k * q.shape[-1] ** -0.5
    c_state = f_act[..., None, None] * c_state + i_act[..., None, None] * (k[..., :, None] * v[..., None, :])
    n_state = f_act[..., None] * n_state + i_act[..., None] * k
    num = (q[..., None, :] @ c_state).squeeze(-2)  # (B, NH, DV)
    den = (q * n_state).sum(dim=-1)  # (B, NH)
    h = num / (torch.maximum(den.abs(), torch.exp(-m_new)) + eps)[..., None]
    return h, (c_state, n_state, m_new)


def mlstm_recurrent(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    igate_preact: Tensor,
    fgate_preact: Tensor,
    *,
    eps: float = EPS,
    state: MLSTMState | None = None,
) -> Tensor:
    """:func:`mlstm_recurrent_step` looped over ``L`` from ``state`` (zeros by default).

    Shapes as :func:`mlstm_parallel`; ``O(L)`` Python steps, meant as a reference and for short inputs.
    """
    _check(q, k, v)
    i_pre, f_pre = _gate(igate_preact, q), _gate(fgate_preact, q)
    state = mlstm_initial_state(q, v) if state is None else state
    outs = []
    for t in range(q.shape[-2]):
        h, state = mlstm_recurrent_step(
            q[:, :, t], k[:, :, t], v[:, :, t], i_pre[:, :, t], f_pre[:, :, t], state, eps=eps
        )
        outs.append(h)
    return torch.stack(outs, dim=2)


def auto_parallel_max_len(head_dim: int, chunk_size: int) -> int:
    """Longest sequence ``impl="auto"`` runs in parallel form: ``max(chunk_size, 2 * head_dim)``.

    Per head the parallel form costs about ``2 L^2 DH`` multiply-adds (scores and output, the masked
    half included); the chunkwise form ``2 L c DH`` inside chunks of ``c`` tokens plus ``2 L DH^2``
    for the ``DH x DV`` chunk states and the queries read against them, and it writes every chunk's
    state for the backward pass. On CPU the two meet near ``L = 2 DH`` for DH = 48-192 (the FLOP
    count alone says ``c + DH``; ``scripts/bench_mlstm_forms.py``, docs/benchmarks/mlstm_forms.md):
    wider heads keep the parallel form the faster one to longer sequences. Never below one chunk,
    where the chunkwise form is the parallel form plus overhead.
    """
    return max(chunk_size, 2 * head_dim)


def mlstm(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    igate_preact: Tensor,
    fgate_preact: Tensor,
    *,
    impl: MLSTMImpl = "auto",
    chunk_size: int = 64,
    parallel_max_len: int | None = None,
    eps: float = EPS,
) -> Tensor:
    """mLSTM ``(B, NH, L, DH/DV) -> (B, NH, L, DV)`` by the chosen form.

    ``impl="auto"`` takes the parallel form up to ``parallel_max_len`` tokens and the chunkwise form
    beyond (the parallel form's ``L^2`` time and memory dominate long 3D sequences); ``None`` means
    :func:`auto_parallel_max_len` of the head width, where the two forms cost the same.
    """
    if impl == "auto":
        if parallel_max_len is None:
            parallel_max_len = auto_parallel_max_len(q.shape[-1], chunk_size)
        impl = "parallel" if q.shape[-2] <= parallel_max_len else "chunkwise"
    if impl == "parallel":
        return mlstm_parallel(q, k, v, igate_preact, fgate_preact, eps=eps)
    if impl == "chunkwise":
        return mlstm_chunkwise(q, k, v, igate_preact, fgate_preact, chunk_size=chunk_size, eps=eps)
    if impl == "recurrent":
        return mlstm_recurrent(q, k, v, igate_preact, fgate_preact, eps=eps)
    raise ValueError(f"unknown mLSTM impl {impl!r}; choose auto, parallel, chunkwise or recurrent")
