"""Fused CPU selective scan: a C++/OpenMP kernel built on first use, wrapped as an autograd Function.

The kernel (``csrc/selective_scan_cpu.cpp`` and its header) makes one pass over the ``(B, D, L, N)`` elements in the
forward and, as mamba-ssm's CUDA kernel does, recomputes the states in the backward from the state saved
every 64 steps instead of storing them: memory between forward and backward is the inputs plus
``(B, D, ceil(L / 64), N)``. Rows ``(b, d)`` run in parallel on torch's intra-op threads, the ``N``
states of a row are one SIMD vector. Softplus, ``delta_bias``, ``D`` and the ``silu(z)`` gate are
applied inside the kernel (in passes over tokens, vectorised over the channels), and ``u``,
``delta``, ``z`` and the output gradient are read with their strides (Mamba's transposed
projections), so what the backward keeps are the caller's tensors, not copies of them. The output
and the gradients of ``u``, ``delta`` and ``z`` are token-major (``stride(1) == 1``, transposed
``(B, L, D)`` tensors), the layout Mamba's ``out_proj`` reads without a copy.

The same extension holds the branch's causal depthwise conv + SiLU (``csrc/causal_conv_cpu.cpp``,
:func:`conv_fused`): on ``(B, E, L)`` inputs of a few tokens (DINO's local crops, VoCo's crops)
oneDNN's grouped ``conv1d`` and its backward cost more than the selective scan itself, and even at
a thousand tokens the weight gradient's depthwise path costs tens of ns per element. The ViL layer's
depthwise grid conv (``csrc/grid_conv_cpu.cpp``, :func:`grid_conv_fused`) is there for the same
reason: PyTorch's depthwise ``Conv3d`` backward took ~8 ms on a batch of 2^3-token grids. The kernel
walks time with the channels innermost (contiguous in Mamba's token-major layout), a few vector
multiply-adds per step, and recomputes the pre-activation in the backward, so it saves only ``x``.

It is compiled with ``torch.utils.cpp_extension.load`` the first time a CPU scan asks for it (about
20 s with g++ on 2 cores; later processes load the build cached under ``$TORCH_EXTENSIONS_DIR`` or
``~/.cache/torch_extensions``). The build is named after the CPU's vector instruction set and the
torch release, so machines sharing a home directory, or a later torch, never load a binary built for
another. When no compiler or ninja is found, or the build fails, :func:`fused_status` says why and
the dispatcher in :mod:`ssl_med.ops.selective_scan` falls back to the torch scan, logging one line.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "selective_scan_cpu.cpp"
HEADER = SOURCE.with_suffix(".h")
#: The scan's lane kernels (16 channels of a B/C group per vector), built into the same extension.
LANES_SOURCE = SOURCE.with_name("selective_scan_lanes.cpp")
#: The per-token passes around the row kernels' recurrence, built into the same extension.
TOKENS_SOURCE = SOURCE.with_name("selective_scan_tokens.cpp")
#: The causal depthwise conv (+ SiLU) of a Mamba branch, built into the same extension.
CONV_SOURCE = SOURCE.with_name("causal_conv_cpu.cpp")
#: The depthwise grid conv of a ViL (xLSTM) layer, built into the same extension.
GRID_SOURCE = SOURCE.with_name("grid_conv_cpu.cpp")
#: Largest state size N the kernel accepts (kMaxState in the C++ source).
MAX_STATE = 256
#: Compiler flags per ``torch.backends.cpu.get_cpu_capability()``; the loops over N vectorise with them.
ARCH_FLAGS = {
    "AVX512": ["-mavx512f", "-mavx512vl", "-mavx512dq", "-mavx512bw", "-mavx2", "-mfma"],
    "AVX2": ["-mavx2", "-mfma"],
}

#: Whether the extension is loaded with its fake kernels, and whether loading was tried; read while
#: ``torch.compile`` traces (where :func:`_load` is not called).
LOADED = False
ATTEMPTED = False


@functools.cache
def _load() -> tuple[Any | None, str]:
    """Build (or load the cached build of) the extension: ``(torch.ops namespace or None, why)``."""
    global ATTEMPTED
    ATTEMPTED = True
    if not all(path.is_file() for path in (SOURCE, HEADER, LANES_SOURCE, TOKENS_SOURCE, CONV_SOURCE, GRID_SOURCE)):
        return None, f"the sources in {SOURCE.parent} are missing from this installation"
    torch_logger = logging.getLogger("torch.utils.cpp_extension")
    level = torch_logger.level
    torch_logger.setLevel(logging.ERROR)  # its import warns about CUDA_HOME on CPU-only machines
    try:
        from torch.utils import cpp_extension
    except Exception as err:  # pragma: no cover - part of every torch install
        return None, f"torch.utils.cpp_extension does not import ({err})"
    finally:
        torch_logger.setLevel(level)
    compiler = cpp_extension.get_cxx_compiler() if hasattr(cpp_extension, "get_cxx_compiler") else "c++"
    if shutil.which(compiler) is None:
        return None, f"no C++ compiler ({compiler!r} not on PATH; set CXX)"
    if not cpp_extension.is_ninja_available():
        return None, "ninja is not installed (pip install ninja)"
    capability = torch.backends.cpu.get_cpu_capability()
    # one build per instruction set and torch release: a cached binary never meets another ABI
    name = re.sub(r"\W", "_", f"ssl_med_selective_scan_{capability}_torch{torch.__version__}").lower()
    start = time.perf_counter()
    try:
        cpp_extension.load(
            name=name,
            sources=[str(SOURCE), str(LANES_SOURCE), str(TOKENS_SOURCE), str(CONV_SOURCE), str(GRID_SOURCE)],
            # -fno-trapping-math lets g++ turn the clamps of the exponential into vector min/max;
            # the header's hash is a flag because torch keys its build cache on sources and flags
            extra_cflags=[
                "-O3",
                "-fopenmp",
                "-fno-trapping-math",
                *ARCH_FLAGS.get(capability, []),
                f"-DSSL_MED_SCAN_HEADER_{_digest(HEADER)}",
            ],
            extra_ldflags=["-fopenmp"],
            is_python_module=False,
            verbose=False,
        )
        ops = torch.ops.ssl_med_scan
        ops.fwd, ops.bwd, ops.conv_fwd, ops.conv_bwd, ops.grid_conv_fwd, ops.grid_conv_bwd  # noqa: B018 - resolve the ops now so a broken build fails here
        _register_fakes()
    except Exception as err:
        logger.debug("building %s failed", name, exc_info=True)
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return None, f"building {name} failed ({first})"
    return ops, f"{name}, built or loaded in {time.perf_counter() - start:.1f} s"




def _register_fakes() -> None:
    """Shape functions of the two ops, so ``torch.compile`` can trace through the kernel as an opaque
    call; without them (an older torch) compiled code keeps to the torch scan."""
    global LOADED
    try:
        _define_fakes()
    except Exception:
        logger.debug("no fake kernels for the fused scan: torch.compile uses the torch scan", exc_info=True)
        return
    LOADED = True


def _define_fakes() -> None:
    @torch.library.register_fake("ssl_med_scan::fwd")
    def _fwd(u, delta, A, B, C, D, z, delta_bias, softplus, save_states):
        batch, dim, length = u.shape
        n, chunks = A.shape[1], -(-length // 64)
        states = u.new_empty(batch if save_states else 0, dim, chunks, n)
        return [_token_major_empty(u), u.new_empty(batch, dim, n), states]

    @torch.library.register_fake("ssl_med_scan::bwd")
    def _bwd(u, delta, A, B, C, D, z, delta_bias, softplus, states, dout, dlast):
        dim = u.shape[1]
        return [_token_major_empty(u), _token_major_empty(u), A.new_empty(A.shape), B.new_empty(B.shape),
                C.new_empty(C.shape), u.new_empty(dim),
                _token_major_empty(u) if z is not None else u.new_empty(0), u.new_empty(dim)]  # fmt: skip


def _token_major_empty(u: Tensor) -> Tensor:
    """An uninitialised ``(B, D, L)`` tensor like ``u``, laid out token-major as the kernel's outputs."""
    batch, dim, length = u.shape
    return u.new_empty(batch, length, dim).transpose(1, 2)


def _digest(path: Path) -> str:
    return hashlib.sha1(path.read_bytes()).hexdigest()[:12]


def fused_available() -> bool:
    """Whether the fused CPU kernel is built and loaded (builds it on the first call)."""
    return _load()[0] is not None


def fused_status() -> str:
    """One line: the loaded build and its load time, or why the kernel is unavailable."""
    return _load()[1]


def _ops() -> Any:
    if LOADED:
        return torch.ops.ssl_med_scan
    ops, why = _load()
    if ops is None:
        raise RuntimeError(f"impl='fused' is unavailable: {why}; use impl='torch' or 'auto'")
    return ops


class _FusedScan(torch.autograd.Function):
    """``out, last = scan(u, delta, A, B, C, D, z, delta_bias)`` by the C++ kernel (inputs pre-laid-out)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus: bool, needs_grad: bool):  # type: ignore[override]
        out, last, states = _ops().fwd(u, delta, A, B, C, D, z, delta_bias, softplus, needs_grad)
        ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, states)
        ctx.softplus = softplus
        ctx.set_materialize_grads(False)
        return out, last

    @staticmethod
    def backward(ctx, dout: Tensor | None, dlast: Tensor | None):  # type: ignore[override]
        u, delta, A, B, C, D, z, delta_bias, states = ctx.saved_tensors
        dout = torch.zeros_like(u) if dout is None else dout  # read with its strides
        dlast = None if dlast is None else dlast.contiguous()
        du, ddelta, dA, dB, dC, dD, dz, dbias = _ops().bwd(
            u, delta, A, B, C, D, z, delta_bias, ctx.softplus, states, dout, dlast
        )
        return (du, ddelta, dA, dB, dC, None if D is None else dD, None if z is None else dz,
                None if delta_bias is None else dbias, None, None)  # fmt: skip


def _token_major(t: Tensor) -> Tensor:
    """``(B, E, L)`` with the channels adjacent in memory (``stride(1) == 1``), copied only if needed."""
    return t if t.stride(1) == 1 or t.shape[1] == 1 else t.transpose(1, 2).contiguous().transpose(1, 2)


class _FusedConv(torch.autograd.Function):
    """``[silu](causal depthwise conv1d(x))`` by the C++ kernel; saves only the inputs.

    The kernel runs over token-major data (its inner loop is over channels): a channel-major ``x``
    is copied once, and its output is returned channel-major again.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, silu: bool):  # type: ignore[override]
        xt = _token_major(x)
        ctx.save_for_backward(xt, weight, bias)
        ctx.silu = silu
        out = _ops().conv_fwd(xt, weight, bias, silu)
        return out if xt is x else out.contiguous()

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, weight, bias = ctx.saved_tensors
        dx, dw, db = _ops().conv_bwd(x, weight, bias, ctx.silu, _token_major(grad))
        return dx, dw, None if bias is None else db, None


def _eager_cpu_float(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """CPU float32/float64 inputs of one dtype, outside autocast: what the C++ kernels compute in."""
    return (
        x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.float64)
        and weight.dtype == x.dtype
        and (bias is None or bias.dtype == x.dtype)
        and not torch.is_autocast_enabled("cpu")
    )


def conv_applies(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether :func:`conv_fused` takes these inputs: ``(B, E, L)`` CPU float32/float64 of one dtype, outside autocast."""
    return x.ndim == 3 and _eager_cpu_float(x, weight, bias)


def conv_fused(x: Tensor, weight: Tensor, bias: Tensor | None, silu: bool) -> Tensor:
    """Causal depthwise conv1d (+ SiLU) by the C++ kernel.

    Args:
        x: ``(B, E, L)``, any strides; a token-major view (``x.stride(1) == 1``, as Mamba's
            projections lay it out) gives a token-major output, any other layout a contiguous one.
        weight: ``(E, K)``; output ``t`` sees inputs ``t-K+1 .. t``.
        bias: ``(E,)`` or ``None``.
        silu: apply SiLU to the convolution.

    Returns:
        ``(B, E, L)`` in ``x``'s dtype.
    """
    if not conv_applies(x, weight, bias):
        raise ValueError("conv_fused takes CPU float32/float64 tensors of one dtype, outside autocast")
    return _FusedConv.apply(x, weight.contiguous(), None if bias is None else bias.contiguous(), silu)


class _FusedGridConv(torch.autograd.Function):
    """Depthwise grid conv by the C++ kernel; saves only the inputs."""

    @staticmethod
    def forward(ctx, x, weight, bias, grid: tuple[int, ...], kernel: int):  # type: ignore[override]
        ctx.save_for_backward(x, weight, bias)
        ctx.grid, ctx.kernel = grid, kernel
        return _ops().grid_conv_fwd(x, weight, bias, list(grid), kernel)

    @staticmethod
    def backward(ctx, grad: Tensor):  # type: ignore[override]
        x, weight, bias = ctx.saved_tensors
        grad = grad if grad.stride(-1) == 1 else grad.contiguous()
        dx, dw, db = _ops().grid_conv_bwd(x, weight, bias, list(ctx.grid), ctx.kernel, grad)
        return dx, dw, None if bias is None else db, None, None


def grid_conv_applies(x: Tensor, weight: Tensor, bias: Tensor | None) -> bool:
    """Whether :func:`grid_conv_fused` runs here: the extension is built, eager mode (not under
    ``torch.compile``), CPU float32/float64 inputs of one dtype outside autocast."""
    return _eager_cpu_float(x, weight, bias) and not torch.compiler.is_compiling() and fused_available()


def grid_conv_fused(x: Tensor, weight: Tensor, bias: Tensor | None, grid: tuple[int, ...]) -> Tensor:
    """Depthwise ``k^d`` convolution (zero padding ``k // 2``) over a token grid by the C++ kernel.

    Args:
        x: ``(B, N, C)``, the ``N = prod(grid)`` tokens in raster order (last axis fastest).
        weight: ``nn.Conv2d``/``nn.Conv3d``'s depthwise weight ``(C, 1, k, k[, k])``.
        bias: ``(C,)`` or ``None``.
        grid: the 2D or 3D token grid.

    Returns:
        ``(B, N, C)`` contiguous, in ``x``'s dtype; equal to the conv over ``x`` reshaped to the grid.
    """
    x = x if x.stride(-1) == 1 else x.contiguous()
    kernel = weight.shape[-1]
    flat = weight.reshape(weight.shape[0], -1).to(x.dtype)
    return _FusedGridConv.apply(x, flat, None if bias is None else bias.to(x.dtype), tuple(grid), kernel)


def _layout_bc(M: Tensor, batch: int, channels: int, dtype: torch.dtype) -> Tensor:
    """B or C -> the kernel's layouts: constant ``(D, N)``, or input-dependent ``(B, G, L, N)``.

    ``(B, N, L)`` is one group; a batch of 1 is expanded to ``batch`` (autograd sums it back).
    """
    M = M.to(dtype)
    if M.ndim == 2:
        return M.contiguous()
    if M.ndim == 3:
        M = M[:, None]
    if M.ndim != 4:
        raise ValueError(f"B/C must be (D, N), (B, N, L) or (B, G, N, L), got {tuple(M.shape)}")
    if channels % M.shape[1]:
        raise ValueError(f"{M.shape[1]} groups do not divide {channels} channels")
    return M.transpose(2, 3).expand(batch, -1, -1, -1).contiguous()


def scan_fused(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
    return_last_state: bool,
) -> Tensor | tuple[Tensor, Tensor]:
    """The selective scan by the fused kernel; arguments and results as ``selective_scan``'s.

    Computes in ``promote(u.dtype, float32)`` (float32 or float64); returns ``out`` in ``u``'s dtype
    and the last state ``(B, D, N)`` in the compute dtype.
    """
    if A.is_complex():
        raise NotImplementedError("complex A is not supported by the fused selective scan")
    if u.device.type != "cpu":
        raise RuntimeError(f"impl='fused' runs on the CPU, got {u.device.type} tensors; use impl='auto'")
    if u.ndim != 3 or delta.shape != u.shape:
        raise ValueError(f"u and delta must both be (B, D, L), got {tuple(u.shape)} and {tuple(delta.shape)}")
    _ops()  # raises, with the reason, when the kernel is unavailable
    dtype_in = u.dtype
    dtype = torch.promote_types(u.dtype, torch.float32)
    batch, channels, _ = u.shape

    def vec(t: Tensor | None) -> Tensor | None:
        return None if t is None else t.to(dtype).contiguous()

    # u, delta and z keep their strides (the kernel reads transposed views): the Function saves the
    # caller's tensors rather than contiguous copies of them
    inputs = (
        u.to(dtype),
        delta.to(dtype),
        A.to(dtype).contiguous(),
        _layout_bc(B, batch, channels, dtype),
        _layout_bc(C, batch, channels, dtype),
        vec(D),
        None if z is None else z.to(dtype),
        vec(delta_bias),
    )
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs)
    out, last = _FusedScan.apply(*inputs, delta_softplus, needs_grad)
    out = out.to(dtype_in)
    return (out, last) if return_last_state else out
