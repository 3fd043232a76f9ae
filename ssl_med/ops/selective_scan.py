"""Mamba's selective scan (S6) and the depthwise causal conv1d, with a fast pure-PyTorch CPU path.

Semantics follow ``selective_scan_fn`` of state-spaces/mamba (``mamba_ssm/ops/selective_scan_interface.py``)::

    delta <- softplus(delta + delta_bias)            (bias and softplus optional, bias first)
    h_t    = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t        h_{-1} = 0, state (B, D, N)
    y_t    = <h_t, C_t>  (+ D * u_t)  (* silu(z_t))

Shapes: ``u, delta, z`` ``(B, D, L)``; ``A`` ``(D, N)`` (real); ``B`` and ``C`` each constant ``(D, N)``,
input-dependent ``(B, N, L)`` or grouped ``(B, G, N, L)`` (channel ``d`` uses group ``d // (D / G)``);
``D`` and ``delta_bias`` ``(D,)``. Returns ``out`` ``(B, D, L)`` in ``u``'s dtype, and with
``return_last_state`` also the final state ``(B, D, N)`` in the compute dtype.

Implementations (``impl=``):

* ``"cuda"`` — mamba-ssm's fused kernel (imported lazily; CUDA tensors only).
* ``"fused"`` — the fused CPU kernel of :mod:`ssl_med.ops.selective_scan_fused` (C++/OpenMP, built on
  first use): one pass per element forward, states recomputed in the backward as mamba-ssm's CUDA
  kernel does. :func:`causal_conv1d` given the same ``impl`` runs in that extension too.
* ``"torch"`` — :class:`_ChunkedScan`: a work-efficient blocked scan with a hand-written backward.
  The linear recurrence ``h_t = a_t h_{t-1} + b_t`` is an associative scan over pairs ``(a, b)``.
  The sequence is cut into chunks of ``chunk`` steps; ``chunk - 1`` vector operations advance every
  chunk at once (local states and in-chunk decay products), the chunk-end states are combined by the
  same scan applied recursively to the chunk sequence, and one fused multiply-add carries them into
  the chunks. That is ``log_chunk(L)`` levels of ``2 (chunk - 1) + 1`` whole-tensor operations, with
  no Python loop over time steps (measured 1.6–2.3× faster than Hillis–Steele doubling inside chunks). Decays ``a = exp(delta * A)`` lie in ``(0, 1]`` and
  are only ever *multiplied*, never divided, so cumulative decays can underflow to their true limit
  0 but never overflow or produce NaN (the failure of cumprod-and-divide scans on long sequences).
  The backward recomputes the states and runs the reverse scan ``g_t = a_{t+1} g_{t+1} + C_t dy_t``;
  only the inputs are saved, so memory stays ``O(B D L N)`` per channel slice rather than per step.
  Runs on any device and under ``torch.compile``.
* ``"ref"`` — a plain sequential loop (autograd through it), for tests only.
* ``"auto"`` — CUDA tensors: ``"cuda"`` when mamba-ssm imports, else ``"torch"``; CPU tensors:
  ``"fused"`` when the extension builds (or is cached), else ``"torch"`` (the reason is logged once);
  under ``torch.compile`` the kernel is an opaque op with fake shapes (a first call inside a trace
  loads it outside the graph); other devices: ``"torch"``. The environment variable
  ``SSL_MED_SCAN_IMPL`` (``cuda | fused | torch | ref``) replaces ``"auto"`` in every call, so a
  whole model can be run on one path (benchmarks, debugging).

Differences from mamba-ssm: its kernel's backward ignores the gradient of the returned last state
(inference only); ``"fused"``, ``"torch"`` and ``"ref"`` propagate it (checked on an H200:
docs/benchmarks/gpu.md). Its reference upcasts to float32 with ``.float()``, which
*downcasts* float64; here the compute dtype is ``promote(u.dtype, float32)`` so float64 stays float64.
Complex ``A`` is not supported.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

ScanImpl = Literal["auto", "cuda", "fused", "torch", "ref"]
IMPLS = ("cuda", "fused", "torch", "ref")
#: Environment variable that replaces ``impl="auto"`` (one of :data:`IMPLS`).
IMPL_ENV = "SSL_MED_SCAN_IMPL"

logger = logging.getLogger(__name__)

#: Steps per chunk of the torch scan (measured on CPU, scripts/bench_scan.py: 4 and 8 best, 16 ~30% slower).
DEFAULT_CHUNK = 4
#: Upper bound on the elements of one ``(B, d, L, N)`` work tensor; channels are processed in slices
#: small enough to stay in the CPU cache across the scan's passes (measured: 2^16..2^18 is best on CPU).
SLICE_ELEMENTS = 1 << 17
#: The same bound on a GPU, where slices only bound memory (256 MiB per float32 work tensor).
CUDA_SLICE_ELEMENTS = 1 << 26


# ---------------------------------------------------------------------------------------------
# optional CUDA kernels (never required to import this module)
# ---------------------------------------------------------------------------------------------
@functools.cache
def _mamba_kernel() -> Callable[..., object] | None:
    """mamba-ssm's ``selective_scan_fn``, or ``None`` when it is not installed or does not load."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except Exception:  # ImportError, or an ABI mismatch surfacing as OSError/RuntimeError
        return None
    return selective_scan_fn


@functools.cache
def _causal_conv1d_kernel() -> Callable[..., Tensor] | None:
    """causal-conv1d's ``causal_conv1d_fn``, or ``None``."""
    try:
        from causal_conv1d import causal_conv1d_fn
    except Exception:
        return None
    return causal_conv1d_fn


def cuda_kernel_available() -> bool:
    """Whether mamba-ssm's selective-scan kernel can be used (installed and a GPU visible)."""
    return torch.cuda.is_available() and _mamba_kernel() is not None


# ---------------------------------------------------------------------------------------------
# causal depthwise conv1d
# ---------------------------------------------------------------------------------------------
def causal_conv1d(
    x: Tensor,
    weight: Tensor,
    bias: Tensor | None = None,
    activation: Literal["silu"] | None = None,
    impl: ScanImpl = "auto",
) -> Tensor:
    """Depthwise causal convolution along the last axis.

    Args:
        x: ``(B, D, L)``.
        weight: ``(D, K)`` (or ``nn.Conv1d``'s ``(D, 1, K)``); output ``t`` sees inputs ``t-K+1 .. t``.
        bias: ``(D,)`` or ``None``.
        activation: ``"silu"`` or ``None``.
        impl: the selective-scan implementation of the caller (:func:`resolve_impl`); where it
            resolves to ``"fused"`` the conv runs in the same C++ extension.

    Returns:
        ``(B, D, L)``, token-major in memory when ``x`` is (``x.stride(1) == 1``). Uses
        causal-conv1d's kernel for CUDA tensors when it is installed and supports the width (2..4);
        on the CPU the fused kernel of :mod:`ssl_med.ops.selective_scan_fused` (float32/float64
        outside autocast, eager mode); else ``F.conv1d`` on the input left-padded with ``K - 1`` zeros.
    """
    if weight.ndim == 3:
        weight = weight.squeeze(1)
    width = weight.shape[-1]
    kernel = _causal_conv1d_kernel() if x.is_cuda else None
    if kernel is not None and 2 <= width <= 4:
        return kernel(x, weight, bias, activation=activation)
    if x.device.type == "cpu" and not torch.compiler.is_compiling() and resolve_impl(impl, x.device) == "fused":
        from ssl_med.ops import selective_scan_fused

        if selective_scan_fused.conv_applies(x, weight, bias):
            return selective_scan_fused.conv_fused(x, weight, bias, silu=activation == "silu")
    if activation == "silu" and torch.is_grad_enabled() and not torch.compiler.is_compiling():
        return _ConvSilu.apply(x, weight, bias)
    return _conv_silu(x, weight, bias, activation == "silu")


def _conv_silu(x: Tensor, weight: Tensor, bias: Tensor | None, silu: bool) -> Tensor:
    """``[silu](conv1d(left-pad(x)))`` ``(B, D, L)``, laid out in memory as ``x`` is.

    A token-major input (``x.stride(1) == 1``, a transposed ``(B, L, D)`` tensor) gives a token-major
    output, so the ``x_proj`` that follows in a Mamba branch reads it without a copy.
    """
    out = F.conv1d(F.pad(x, (weight.shape[-1] - 1, 0)), weight.unsqueeze(1), bias, groups=weight.shape[0])
    out = F.silu(out) if silu else out
    if x.stride(1) == 1 and x.shape[1] > 1:
        out = out.transpose(1, 2).contiguous().transpose(1, 2)
    return out


class _ConvSilu(torch.autograd.Function):
    """``silu(causal depthwise conv1d(x))`` that saves only its input: the padded copy and the
    pre-activation, which autograd would keep, are recomputed in the backward (cheap: K MACs each)."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, weight, bias)
        device = x.device.type
        ctx.autocast = (device, torch.is_autocast_enabled(device), torch.get_autocast_dtype(device))
        return _conv_silu(x, weight, bias, silu=True)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        saved = ctx.saved_tensors
        leaves = [None if t is None else t.detach().requires_grad_(need) for t, need in
                  zip(saved, ctx.needs_input_grad, strict=True)]  # fmt: skip
        device, enabled, dtype = ctx.autocast  # recompute under the forward's autocast state
        with torch.enable_grad(), torch.autocast(device, dtype=dtype, enabled=enabled):
            out = _conv_silu(leaves[0], leaves[1], leaves[2], silu=True)
        wanted = [t for t, need in zip(leaves, ctx.needs_input_grad, strict=True) if need]
        grads = iter(torch.autograd.grad(out, wanted, grad) if wanted else ())
        return tuple(next(grads) if need else None for need in ctx.needs_input_grad)


# ---------------------------------------------------------------------------------------------
# the associative scan (no autograd; used by the forward and the backward of _ChunkedScan)
# ---------------------------------------------------------------------------------------------
def _chunk_scan_(a: Tensor, b: Tensor) -> None:
    """In place along dim -2 of ``(..., T, N)`` (T small): ``b`` <- states from zero, ``a`` <- prefix products.

    One vector step per position inside the chunk, over all leading dims (every chunk) at once.
    """
    for i in range(1, a.shape[-2]):
        b[..., i, :].addcmul_(a[..., i, :], b[..., i - 1, :])
        a[..., i, :].mul_(a[..., i - 1, :])


def linear_scan(a: Tensor, b: Tensor, chunk: int = DEFAULT_CHUNK) -> Tensor:
    """All states of ``h_t = a_t * h_{t-1} + b_t`` (``h_{-1} = 0``) along dim -2, without a time loop.

    Args:
        a: decays ``(..., L, N)`` (consumed: overwritten with scratch values).
        b: inputs ``(..., L, N)`` (consumed).
        chunk: steps per chunk; chunk-end states are combined by this function recursively.

    Returns:
        ``(..., L, N)`` states.
    """
    if chunk < 2:
        raise ValueError(f"chunk must be at least 2, got {chunk}")
    steps = a.shape[-2]
    if steps <= chunk:
        _chunk_scan_(a, b)
        return b
    pad = -steps % chunk
    if pad:  # identity steps (a=1, b=0) at the end cannot change earlier states
        a = F.pad(a, (0, 0, 0, pad), value=1.0)
        b = F.pad(b, (0, 0, 0, pad))
    lead, n = a.shape[:-2], a.shape[-1]
    a = a.reshape(*lead, -1, chunk, n)
    b = b.reshape(*lead, -1, chunk, n)
    _chunk_scan_(a, b)  # local states (zero start) and in-chunk cumulative decays
    ends = linear_scan(a[..., -1, :].clone(), b[..., -1, :].clone(), chunk)  # (..., n_chunks, N)
    b[..., 1:, :, :].addcmul_(a[..., 1:, :, :], ends[..., :-1, None, :])
    return b.reshape(*lead, -1, n)[..., :steps, :]


def _sum_to(t: Tensor, shape: torch.Size) -> Tensor:
    """Sum ``t`` over the axes where ``shape`` has size 1 (reverse of broadcasting, same ndim)."""
    dims = tuple(i for i, (s, n) in enumerate(zip(t.shape, shape)) if n == 1 and s != 1)
    return t.sum(dims, keepdim=True) if dims else t


def _channel_slices(
    channels: int, groups: int, per_channel: int, device: torch.device
) -> Iterator[tuple[int, int, slice]]:
    """Channel ranges ``[d0, d1)`` of bounded work size, and the slice of the B/C group axis they use.

    ``groups == channels``: B/C are per channel; ``groups == 1``: shared; otherwise a range never
    crosses a group boundary, so it reads a single group.
    """
    budget = SLICE_ELEMENTS if device.type == "cpu" else CUDA_SLICE_ELEMENTS
    step = max(1, budget // max(per_channel, 1))
    if groups in (1, channels):
        for d0 in range(0, channels, step):
            d1 = min(d0 + step, channels)
            yield d0, d1, (slice(0, 1) if groups == 1 else slice(d0, d1))
        return
    size = channels // groups
    for g in range(groups):
        for d0 in range(g * size, (g + 1) * size, step):
            yield d0, min(d0 + step, (g + 1) * size), slice(g, g + 1)


def _states(
    delta: Tensor, u: Tensor, A: Tensor, Bn: Tensor, chunk: int, keep_decays: bool = True
) -> tuple[Tensor | None, Tensor]:
    """Decays ``exp(delta A)`` (if ``keep_decays``) and all states for one channel slice, ``(B, d, L, N)``."""
    a = torch.exp(delta[..., None] * A[:, None, :])
    h = linear_scan(a.clone() if keep_decays else a, (delta * u)[..., None] * Bn, chunk)
    return (a if keep_decays else None), h


class _ChunkedScan(torch.autograd.Function):
    """``y = scan(u, delta, A, B, C)`` without D/z/bias; B, C normalised to ``(B|1, G, L|1, N)``."""

    @staticmethod
    def forward(ctx, u: Tensor, delta: Tensor, A: Tensor, Bn: Tensor, Cn: Tensor, chunk: int):  # type: ignore[override]
        batch, channels, steps = u.shape
        groups = Bn.shape[1]
        y = u.new_empty(batch, channels, steps)
        last = u.new_empty(batch, channels, A.shape[-1])
        for d0, d1, g in _channel_slices(channels, groups, batch * steps * A.shape[-1], u.device):
            _, h = _states(delta[:, d0:d1], u[:, d0:d1], A[d0:d1], Bn[:, g], chunk, keep_decays=False)
            last[:, d0:d1] = h[..., -1, :]
            y[:, d0:d1] = (h * Cn[:, g]).sum(-1)
        ctx.save_for_backward(u, delta, A, Bn, Cn)
        ctx.chunk = chunk
        ctx.set_materialize_grads(False)
        return y, last

    @staticmethod
    def backward(ctx, dy: Tensor, dlast: Tensor | None):  # type: ignore[override]
        u, delta, A, Bn, Cn = ctx.saved_tensors
        batch, channels, steps = u.shape
        groups = Bn.shape[1]
        du, ddelta, dA = torch.zeros_like(u), torch.zeros_like(delta), torch.zeros_like(A)
        dB, dC = torch.zeros_like(Bn), torch.zeros_like(Cn)
        if dy is None:
            dy = torch.zeros_like(u)
        for d0, d1, g in _channel_slices(channels, groups, batch * steps * A.shape[-1], u.device):
            dl, ul, Al, Bl, Cl = delta[:, d0:d1], u[:, d0:d1], A[d0:d1], Bn[:, g], Cn[:, g]
            a, h = _states(dl, ul, Al, Bl, ctx.chunk)
            c = dy[:, d0:d1, :, None] * Cl  # dL/dh_t from y_t
            if dlast is not None:
                c[..., -1, :] += dlast[:, d0:d1]
            # reverse scan g_t = a_{t+1} g_{t+1} + c_t, as a forward scan on flipped time
            a_next = torch.cat([a[..., 1:, :], torch.ones_like(a[..., :1, :])], dim=-2)
            grad_h = linear_scan(a_next.flip(-2), c.flip(-2), ctx.chunk).flip(-2)
            dC[:, g] += _sum_to(dy[:, d0:d1, :, None] * h, Cl.shape)
            h_prev = torch.cat([torch.zeros_like(h[..., :1, :]), h[..., :-1, :]], dim=-2)
            d_log_a = grad_h * h_prev * a  # dL/d(delta A)
            gb = (grad_h * Bl).sum(-1)  # dL/d(delta u) summed over N
            ddelta[:, d0:d1] = (d_log_a * Al[:, None, :]).sum(-1) + gb * ul
            du[:, d0:d1] = gb * dl
            dA[d0:d1] = (d_log_a * dl[..., None]).sum((0, 2))
            dB[:, g] += _sum_to(grad_h * (dl * ul)[..., None], Bl.shape)
        return du, ddelta, dA, dB, dC, None


# ---------------------------------------------------------------------------------------------
# input handling shared by the torch and ref paths
# ---------------------------------------------------------------------------------------------
def _normalise_bc(M: Tensor, channels: int, dtype: torch.dtype) -> Tensor:
    """B or C -> ``(B|1, G, L|1, N)``: constant ``(D, N)`` -> G=D; ``(B, N, L)`` -> G=1; grouped kept."""
    M = M.to(dtype)
    if M.ndim == 2:
        return M[None, :, None, :]
    if M.ndim == 3:
        return M.transpose(1, 2)[:, None]
    if M.ndim == 4:
        if channels % M.shape[1]:
            raise ValueError(f"{M.shape[1]} groups do not divide {channels} channels")
        return M.transpose(2, 3)
    raise ValueError(f"B/C must be (D, N), (B, N, L) or (B, G, N, L), got {tuple(M.shape)}")


def _prepare(u: Tensor, delta: Tensor, A: Tensor, delta_bias: Tensor | None, delta_softplus: bool):
    if A.is_complex():
        raise NotImplementedError("complex A is not supported by the torch selective scan")
    if u.ndim != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must both be (B, D, L), got {tuple(u.shape)} and {tuple(delta.shape)}")
    dtype = torch.promote_types(u.dtype, torch.float32)
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    return u.to(dtype), delta, A.to(dtype), dtype


def _finish(y: Tensor, u: Tensor, D: Tensor | None, z: Tensor | None, dtype_in: torch.dtype) -> Tensor:
    if D is not None:
        y = y + u * D.to(y.dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y.to(dtype_in)


def _scan_torch(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, chunk):
    dtype_in = u.dtype
    u, delta, A, dtype = _prepare(u, delta, A, delta_bias, delta_softplus)
    Bn, Cn = _normalise_bc(B, u.shape[1], dtype), _normalise_bc(C, u.shape[1], dtype)
    y, last = _ChunkedScan.apply(u, delta, A, Bn, Cn, chunk)
    out = _finish(y, u, D, z, dtype_in)
    return (out, last) if return_last_state else out


def _scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
    """The sequential loop (mamba-ssm's ``selective_scan_ref`` semantics). Slow; tests only."""
    dtype_in = u.dtype
    u, delta, A, dtype = _prepare(u, delta, A, delta_bias, delta_softplus)
    channels = u.shape[1]
    Bn, Cn = _normalise_bc(B, channels, dtype), _normalise_bc(C, channels, dtype)
    # expand the group axis to channels: (B|1, D, L|1, N)
    Bn = Bn.repeat_interleave(channels // Bn.shape[1], dim=1)
    Cn = Cn.repeat_interleave(channels // Cn.shape[1], dim=1)
    decay = torch.exp(delta[..., None] * A[:, None, :])  # (B, D, L, N)
    drive = (delta * u)[..., None] * Bn
    x = u.new_zeros(u.shape[0], channels, A.shape[1])
    ys = []
    for t in range(u.shape[2]):
        x = decay[:, :, t] * x + drive[:, :, t]
        ys.append((x * Cn[:, :, min(t, Cn.shape[2] - 1)]).sum(-1))
    y = torch.stack(ys, dim=-1)
    out = _finish(y, u, D, z, dtype_in)
    return (out, x) if return_last_state else out


def _scan_cuda(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state):
    kernel = _mamba_kernel()
    if kernel is None:
        raise RuntimeError("impl='cuda' needs mamba-ssm (pip install mamba-ssm); use impl='torch' or 'auto'")
    if not u.is_cuda:
        raise RuntimeError("impl='cuda' needs CUDA tensors; use impl='torch' or 'auto' on the CPU")
    return kernel(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)


@functools.cache
def _cpu_fused_ready() -> bool:
    """Whether ``auto`` takes the fused CPU kernel; builds it on the first call and logs the choice once."""
    from ssl_med.ops import selective_scan_fused

    if selective_scan_fused.fused_available():
        logger.info("selective scan on the CPU: fused C++ kernel (%s)", selective_scan_fused.fused_status())
        return True
    logger.warning(
        "selective scan on the CPU: torch chunked scan, because the fused C++ kernel is unavailable: %s",
        selective_scan_fused.fused_status(),
    )
    return False


def resolve_impl(impl: ScanImpl, device: torch.device) -> str:
    """The implementation ``impl`` stands for on ``device``.

    ``auto`` is first replaced by ``$SSL_MED_SCAN_IMPL`` when that is set, then resolved to ``cuda``
    (CUDA device, mamba-ssm importable), ``fused`` (CPU, extension built) or ``torch``.
    """
    if impl == "auto":
        impl = os.environ.get(IMPL_ENV, "auto").strip().lower() or "auto"  # type: ignore[assignment]
        if impl != "auto" and impl not in IMPLS:
            raise ValueError(f"{IMPL_ENV}={impl!r}; choose auto, {', '.join(IMPLS)}")
    if impl == "auto":
        if device.type == "cuda":
            return "cuda" if _mamba_kernel() is not None else "torch"
        if device.type == "cpu" and _cpu_fused_ready():
            return "fused"
        return "torch"
    if impl not in IMPLS:
        raise ValueError(f"unknown scan impl {impl!r}; choose auto, {', '.join(IMPLS)}")
    return impl


@torch.compiler.disable
def _load_outside_the_trace() -> None:
    """Build or load the fused kernel eagerly when the first CPU scan of a process is being traced:
    dynamo runs this call outside the graph, and the retrace that follows sees the kernel loaded."""
    _cpu_fused_ready()


def _pick_impl(impl: ScanImpl, u: Tensor, A: Tensor) -> str:
    """:func:`resolve_impl` for one call: ``auto`` keeps to the torch scan where the fused kernel does not
    apply (complex ``A``, more than ``MAX_STATE`` states, a ``torch.compile`` trace before it is loaded)."""
    from ssl_med.ops import selective_scan_fused

    if impl == "auto" and u.device.type == "cpu" and torch.compiler.is_compiling():
        if not selective_scan_fused.ATTEMPTED:
            _load_outside_the_trace()  # one graph break, the first time only
        fits = selective_scan_fused.LOADED and not A.is_complex() and A.shape[-1] <= selective_scan_fused.MAX_STATE
        return "fused" if fits and os.environ.get(IMPL_ENV, "auto") in ("auto", "fused") else "torch"
    which = resolve_impl(impl, u.device)
    if which == "fused" and impl == "auto" and (A.is_complex() or A.shape[-1] > selective_scan_fused.MAX_STATE):
        return "torch"
    return which


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    impl: ScanImpl = "auto",
    chunk: int = DEFAULT_CHUNK,
) -> Tensor | tuple[Tensor, Tensor]:
    """Selective scan with mamba-ssm's ``selective_scan_fn`` semantics (see the module docstring).

    Args:
        u: ``(B, D, L)`` input.
        delta: ``(B, D, L)`` step sizes (before ``delta_bias``/softplus).
        A: ``(D, N)`` real state matrix (diagonal per channel; negative for decay).
        B: ``(D, N)``, ``(B, N, L)`` or ``(B, G, N, L)``.
        C: as ``B``.
        D: ``(D,)`` skip, or ``None``.
        z: ``(B, D, L)`` gate (output multiplied by ``silu(z)``), or ``None``.
        delta_bias: ``(D,)`` added to ``delta`` before the softplus.
        delta_softplus: apply ``softplus`` to ``delta``.
        return_last_state: also return the final state ``(B, D, N)``.
        impl: ``auto | cuda | fused | torch | ref`` (``auto``: see the module docstring).
        chunk: steps per chunk of the torch scan (results do not depend on it beyond rounding).

    Returns:
        ``(B, D, L)`` in ``u``'s dtype, or ``(out, last_state)``.
    """
    args = (u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    which = _pick_impl(impl, u, A)
    if which == "cuda":
        return _scan_cuda(*args)
    if which == "fused":
        from ssl_med.ops.selective_scan_fused import scan_fused

        return scan_fused(*args)
    if which == "ref":
        return _scan_ref(*args)
    return _scan_torch(*args, chunk)
