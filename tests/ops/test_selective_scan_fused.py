"""The fused CPU selective scan (C++ extension): parity with the sequential reference, dispatch, fallback.

Every test here needs the extension and skips, with the reason, where it cannot be built; the module
fixture builds it once per session (later sessions load the cached build).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import ssl_med.ops.selective_scan as scan_ops
import ssl_med.ops.selective_scan_fused as fused_ops
from ssl_med.ops.selective_scan import resolve_impl, selective_scan

F64 = torch.float64


@pytest.fixture(scope="module", autouse=True)
def _built() -> None:
    if not fused_ops.fused_available():
        pytest.skip(f"fused CPU kernel unavailable: {fused_ops.fused_status()}")


def bc_tensor(
    kind: str, b: int, d: int, n: int, L: int, g: torch.Generator, dtype: torch.dtype
) -> torch.Tensor:
    """B or C: ``constant`` (d, n), ``variable`` (b, n, L), ``shared`` (1, n, L), ``grouped`` (b, 2, n, L)."""
    shape = {"constant": (d, n), "variable": (b, n, L), "shared": (1, n, L), "grouped": (b, 2, n, L)}[kind]
    return torch.randn(*shape, generator=g, dtype=dtype)


def inputs(
    L: int, b: int, d: int, n: int, B_kind: str, C_kind: str, dtype=F64, seed: int = 0, wide_steps=False
):
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(b, d, L, generator=g, dtype=dtype)
    # wide_steps: raw steps in [-30, 30] cross both branches of softplus (threshold 20, tails)
    delta = (
        (60 * torch.rand(b, d, L, generator=g, dtype=dtype) - 30)
        if wide_steps
        else torch.rand(b, d, L, generator=g, dtype=dtype) - 0.5
    )
    A = -0.5 - torch.rand(d, n, generator=g, dtype=dtype)
    B, C = bc_tensor(B_kind, b, d, n, L, g, dtype), bc_tensor(C_kind, b, d, n, L, g, dtype)
    extras = {
        "D": torch.randn(d, generator=g, dtype=dtype),
        "z": torch.randn(b, d, L, generator=g, dtype=dtype),
        "delta_bias": 0.2 * torch.randn(d, generator=g, dtype=dtype),
    }
    return [u, delta, A, B, C], extras


def run(impl: str, tensors, extras, softplus=True, last_weight=1.0):
    """Output, last state and the gradients of a loss that uses both, for every tensor input."""
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    ex = {k: (v.detach().clone().requires_grad_() if v is not None else None) for k, v in extras.items()}
    out, last = selective_scan(*leaves, **ex, delta_softplus=softplus, return_last_state=True, impl=impl)
    loss = (out * torch.cos(out)).sum() + last_weight * last.square().sum()
    grads = torch.autograd.grad(loss, leaves + [v for v in ex.values() if v is not None])
    return out, last, grads


def assert_same(a, b, rtol=1e-10, atol=1e-10) -> None:
    (o1, l1, g1), (o2, l2, g2) = a, b
    torch.testing.assert_close(o1, o2, rtol=rtol, atol=atol)
    torch.testing.assert_close(l1, l2, rtol=rtol, atol=atol)
    for x, y in zip(g1, g2, strict=True):
        torch.testing.assert_close(x, y, rtol=rtol, atol=atol * max(1.0, y.abs().max().item()))


# lengths around the 64-step recompute chunk; N = 16 is the kernel's compiled fast path
LAYOUTS = [
    (1, 2, 3, 16, "variable", "variable"),
    (63, 2, 3, 4, "variable", "constant"),
    (64, 1, 4, 16, "grouped", "grouped"),
    (65, 2, 6, 5, "constant", "grouped"),
    (129, 3, 2, 16, "shared", "variable"),
    (200, 2, 4, 3, "constant", "constant"),
    # 16 channels of a group per vector lane (input-dependent B and C, N = 16)
    (65, 2, 32, 16, "grouped", "grouped"),
    (130, 1, 64, 16, "variable", "grouped"),
]


def token_major(t: torch.Tensor) -> torch.Tensor:
    """``t`` ``(B, D, L)`` as the transposed view of a contiguous ``(B, L, D)`` tensor (Mamba's layout)."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


@pytest.mark.parametrize(("L", "b", "d", "n", "B_kind", "C_kind"), LAYOUTS)
@pytest.mark.parametrize("options", ["all", "none"])
@pytest.mark.parametrize("layout", ["channel-major", "token-major"])
def test_float64_matches_reference(L, b, d, n, B_kind, C_kind, options, layout) -> None:
    """Outputs, last state and every gradient equal the sequential loop in float64, whether u, delta
    and z are contiguous (B, D, L) tensors or token-major views (the lane kernel's fused forward)."""
    tensors, extras = inputs(L, b, d, n, B_kind, C_kind)
    if options == "none":
        extras = dict.fromkeys(extras)
    softplus = options == "all"
    expected = run("ref", tensors, extras, softplus)
    if layout == "token-major":
        tensors = [token_major(tensors[0]), token_major(tensors[1]), *tensors[2:]]
        extras = {k: token_major(v) if k == "z" and v is not None else v for k, v in extras.items()}
    assert_same(run("fused", tensors, extras, softplus), expected)


def test_float64_matches_reference_with_wide_steps() -> None:
    """Raw steps from -30 to 30 (softplus tails and its threshold) and a gradient of the output alone."""
    tensors, extras = inputs(150, 2, 3, 16, "variable", "variable", wide_steps=True)
    tensors[2] = tensors[2] / 8  # keep some decays away from 0 with steps up to 30
    assert_same(run("fused", tensors, extras, last_weight=0.0), run("ref", tensors, extras, last_weight=0.0))


@pytest.mark.parametrize(
    ("n", "B_kind", "d", "layout"),
    [(16, "variable", 4, "channel-major"), (7, "grouped", 4, "channel-major"), (16, "grouped", 32, "token-major")],
)
def test_float32_as_accurate_as_the_reference_in_float32(n: int, B_kind: str, d: int, layout: str) -> None:
    """Float32 (the vectorised exponential, softplus and logistic, the chunked backward) is as accurate
    as the sequential reference run in float32: against float64, its largest error per output and per
    gradient stays within 3x the reference's own float32 error.

    A fixed relative tolerance is the wrong yardstick here: the gradients sum 300 steps whose terms are
    up to ~10^5, so both float32 implementations are off by a few units (relative 1e-4 to 2e-3), and the
    summation order, hence the exact error, changes with the CPU's vector width (AVX2 or AVX-512). A
    wrong exponential or a lost term is orders of magnitude above the reference's error.
    """
    tensors, extras = inputs(300, 2, d, n, B_kind, B_kind, dtype=F64, seed=1, wide_steps=True)
    tensors[2] = tensors[2] / 8
    expected = run("ref", tensors, extras)
    as_f32 = ([t.float() for t in tensors], {k: v.float() for k, v in extras.items()})
    if layout == "token-major":  # the lane kernels, forward and backward
        as_f32 = (
            [token_major(as_f32[0][0]), token_major(as_f32[0][1]), *as_f32[0][2:]],
            {**as_f32[1], "z": token_major(as_f32[1]["z"])},
        )
    got, ref32 = run("fused", *as_f32), run("ref", *as_f32)
    flat = [(o, last, *grads) for o, last, grads in (got, ref32, expected)]
    for i, (x, r, y) in enumerate(zip(*flat, strict=True)):
        assert x.dtype == torch.float32
        err, ref_err = (x.double() - y).abs().max().item(), (r.double() - y).abs().max().item()
        assert err <= 3 * ref_err + 1e-6 * max(1.0, y.abs().max().item()), (i, err, ref_err)


@pytest.mark.parametrize("d", [8, 64])  # rows; lane blocks (three threads split a group of 32 in two)
def test_results_do_not_depend_on_the_thread_count(d: int) -> None:
    """The per-thread partial sums of dB/dC change only the summation order."""
    tensors, extras = inputs(100, 1, d, 16, "variable", "grouped", dtype=torch.float32, seed=2)
    if d == 64:  # token-major, as the lane kernels read them
        tensors = [token_major(tensors[0]), token_major(tensors[1]), *tensors[2:]]
        extras = {**extras, "z": token_major(extras["z"])}
    results = []
    for threads in (1, 2, 3):
        torch.set_num_threads(threads)
        results.append(run("fused", tensors, extras))
    for other in results[1:]:
        assert_same(other, results[0], rtol=1e-5, atol=1e-5)


def test_no_grad_forward_and_non_contiguous_inputs() -> None:
    """Inference saves no states; transposed inputs (as Mamba's x_proj output) are laid out by the wrapper."""
    tensors, extras = inputs(70, 2, 4, 16, "variable", "variable")
    u, delta, A, B, C = tensors
    B_t = B.transpose(1, 2).contiguous().transpose(1, 2)  # (b, n, L) view of a (b, L, n) tensor
    expected = selective_scan(u, delta, A, B, C, **extras, delta_softplus=True, impl="ref")
    with torch.no_grad():
        got = selective_scan(
            u,
            delta.transpose(1, 2).contiguous().transpose(1, 2),
            A,
            B_t,
            C,
            **extras,
            delta_softplus=True,
            impl="fused",
        )
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_strided_inputs_match_contiguous_ones() -> None:
    """u, delta and z as transposed (B, L, D) views (Mamba's layout): same results and gradients."""
    tensors, extras = inputs(90, 2, 5, 16, "variable", "variable")
    contiguous = run("fused", tensors, extras)
    strided = [token_major(tensors[0]), token_major(tensors[1]), *tensors[2:]]
    got = run("fused", strided, {**extras, "z": token_major(extras["z"])})
    assert_same(got, contiguous, rtol=1e-12, atol=1e-12)
    assert_same(got, run("ref", tensors, extras))


def test_auto_picks_the_fused_kernel_on_the_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu = torch.device("cpu")
    assert resolve_impl("auto", cpu) == "fused"
    assert resolve_impl("torch", cpu) == "torch"
    monkeypatch.setenv(scan_ops.IMPL_ENV, "torch")
    assert resolve_impl("auto", cpu) == "torch"
    assert resolve_impl("ref", cpu) == "ref"  # an explicit impl wins over the variable
    monkeypatch.setenv(scan_ops.IMPL_ENV, "fast")
    with pytest.raises(ValueError, match=scan_ops.IMPL_ENV):
        resolve_impl("auto", cpu)


def test_auto_under_torch_compile_uses_the_loaded_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    (u, _, A, _, _), _ = inputs(4, 1, 2, 16, "variable", "variable")
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert scan_ops._pick_impl("auto", u, A) == "fused"
    monkeypatch.setattr(fused_ops, "LOADED", False)  # never built in this process: no build inside a trace
    assert scan_ops._pick_impl("auto", u, A) == "torch"


def test_torch_compile_traces_the_kernel_as_one_graph() -> None:
    """aot_eager (dynamo + autograd tracing, no code generation): the kernel is an opaque op with fake
    shapes, forward and backward, without a graph break; results equal the eager call's."""
    tensors, extras = inputs(70, 2, 4, 16, "variable", "grouped", dtype=torch.float32)

    def loss(*args: torch.Tensor) -> torch.Tensor:
        return selective_scan(*args[:5], *args[5:], delta_softplus=True).square().sum()

    flat = [*tensors, extras["D"], extras["z"], extras["delta_bias"]]
    results = []
    for fn in (loss, torch.compile(loss, backend="aot_eager", fullgraph=True)):
        leaves = [t.clone().requires_grad_() for t in flat]
        value = fn(*leaves)
        results.append((value, torch.autograd.grad(value, leaves)))
    torch._dynamo.reset()
    torch.testing.assert_close(results[1][0], results[0][0])
    for a, b in zip(results[1][1], results[0][1], strict=True):
        torch.testing.assert_close(a, b)


def _conv_input(layout: str, b: int, d: int, L: int, g: torch.Generator, dtype=F64) -> torch.Tensor:
    """x ``(b, d, L)``: ``token``-major (a transposed (b, L, d) tensor), ``channel``-major
    (contiguous), or ``slice``: the first half of the channels of a token-major ``(b, 2d, L)``, as a
    Mamba branch gets x out of the shared ``in_proj``."""
    if layout == "channel":
        return torch.randn(b, d, L, generator=g, dtype=dtype)
    if layout == "token":
        return torch.randn(b, L, d, generator=g, dtype=dtype).transpose(1, 2)
    return torch.randn(b, L, 2 * d, generator=g, dtype=dtype).transpose(1, 2)[:, :d]


@pytest.mark.parametrize("layout", ["token", "channel", "slice"])
@pytest.mark.parametrize(("L", "width"), [(1, 4), (3, 4), (5, 4), (17, 4), (70, 2)])
@pytest.mark.parametrize("options", ["silu+bias", "plain"])
def test_fused_conv_float64_matches_padded_conv(layout: str, L: int, width: int, options: str) -> None:
    """The C++ causal depthwise conv (+ SiLU): outputs and the gradients of x, weight and bias equal
    autograd's through pad + grouped conv1d (+ silu), for sequences shorter and longer than the conv."""
    g = torch.Generator().manual_seed(L)
    silu, with_bias = options == "silu+bias", options == "silu+bias"
    x = _conv_input(layout, 2, 6, L, g).requires_grad_()
    w = torch.randn(6, width, generator=g, dtype=F64, requires_grad=True)
    bias = torch.randn(6, generator=g, dtype=F64, requires_grad=True) if with_bias else None
    leaves = [t for t in (x, w, bias) if t is not None]
    grad = torch.randn(2, 6, L, generator=g, dtype=F64)
    got = fused_ops.conv_fused(x, w, bias, silu=silu)
    want = torch.nn.functional.conv1d(torch.nn.functional.pad(x, (width - 1, 0)), w[:, None], bias, groups=6)
    want = torch.nn.functional.silu(want) if silu else want
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    if L > 1:  # token-major in, token-major out
        assert (got.stride(1) == 1) == (layout != "channel")
    for a, b in zip(torch.autograd.grad(got, leaves, grad), torch.autograd.grad(want, leaves, grad), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_causal_conv1d_dispatch(monkeypatch: pytest.MonkeyPatch) -> None:
    """``auto`` on CPU float32 takes the fused conv; ``impl="torch"`` and bf16 autocast keep ``F.conv1d``."""
    calls = []
    real = fused_ops.conv_fused
    monkeypatch.setattr(fused_ops, "conv_fused", lambda *a, **k: calls.append(1) or real(*a, **k))
    x, w, bias = torch.randn(2, 5, 4).transpose(1, 2), torch.randn(4, 4), torch.randn(4)
    fused = scan_ops.causal_conv1d(x, w, bias, activation="silu")
    assert len(calls) == 1
    plain = scan_ops.causal_conv1d(x, w, bias, activation="silu", impl="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scan_ops.causal_conv1d(x, w, bias, activation="silu")
    assert len(calls) == 1
    torch.testing.assert_close(fused, plain)


FIRST_CALL_COMPILED = """
import torch
from ssl_med.ops import selective_scan_fused
from ssl_med.ops.selective_scan import selective_scan

args = [torch.randn(1, 4, 30), torch.randn(1, 4, 30), -torch.rand(4, 16) - 0.5, torch.randn(1, 16, 30),
        torch.randn(1, 16, 30)]
compiled = torch.compile(lambda *a: selective_scan(*a, delta_softplus=True), backend="aot_eager")
out = compiled(*args)
assert selective_scan_fused.LOADED
torch.testing.assert_close(out, selective_scan(*args, delta_softplus=True, impl="fused"), rtol=0, atol=0)
"""


@pytest.mark.slow  # a fresh interpreter (about 15 s)
def test_a_process_whose_first_scan_is_compiled_loads_the_kernel() -> None:
    """The first CPU scan of a process inside torch.compile loads the kernel outside the trace and uses it."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    subprocess.run([sys.executable, "-c", FIRST_CALL_COMPILED], check=True, env=env, timeout=300)


@pytest.fixture
def no_compiler(monkeypatch: pytest.MonkeyPatch):
    """The extension 'fails to build' for one test; the dispatcher's cached choice is reset around it."""
    monkeypatch.setattr(fused_ops, "_load", lambda: (None, "no C++ compiler ('c++' not on PATH; set CXX)"))
    monkeypatch.setattr(fused_ops, "LOADED", False)
    scan_ops._cpu_fused_ready.cache_clear()
    yield
    scan_ops._cpu_fused_ready.cache_clear()


def test_fallback_to_the_torch_scan_logs_one_line(no_compiler, caplog: pytest.LogCaptureFixture) -> None:
    tensors, extras = inputs(20, 1, 2, 4, "variable", "variable")
    with caplog.at_level(logging.INFO, logger=scan_ops.__name__):
        first = selective_scan(*tensors, **extras)
        second = selective_scan(*tensors, **extras)
    lines = [r.getMessage() for r in caplog.records if r.name == scan_ops.__name__]
    assert len(lines) == 1 and "torch chunked scan" in lines[0] and "no C++ compiler" in lines[0]
    torch.testing.assert_close(first, selective_scan(*tensors, **extras, impl="torch"))
    torch.testing.assert_close(first, second)
    with pytest.raises(RuntimeError, match="no C\\+\\+ compiler"):
        selective_scan(*tensors, impl="fused")


@pytest.mark.parametrize(
    ("grid", "kernel"), [((1, 1), 3), ((2, 2), 3), ((4, 5), 3), ((3, 6), 5), ((2, 2, 2), 3), ((3, 4, 5), 3)]
)
@pytest.mark.parametrize("with_bias", [True, False])
def test_fused_grid_conv_float64_matches_nn_conv(grid: tuple[int, ...], kernel: int, with_bias: bool) -> None:
    """The C++ depthwise grid conv on (B, N, C) tokens: outputs and the gradients of x, weight and bias
    equal ``nn.Conv2d/3d`` (padding k // 2) on the tokens reshaped to the grid; x is a channel slice of a
    wider tensor, as the ViL layer's ``proj_up`` output."""
    g = torch.Generator().manual_seed(len(grid) * 10 + kernel)
    b, c, n = 3, 6, int(torch.tensor(grid).prod())
    conv = (torch.nn.Conv2d if len(grid) == 2 else torch.nn.Conv3d)(
        c, c, kernel, padding=kernel // 2, groups=c, bias=with_bias
    ).double()
    x = torch.randn(b, n, 2 * c, generator=g, dtype=F64)[..., :c].requires_grad_()
    grad = torch.randn(b, n, c, generator=g, dtype=F64)
    got = fused_ops.grid_conv_fused(x, conv.weight, conv.bias, grid)
    want = conv(x.transpose(1, 2).reshape(b, c, *grid)).flatten(2).transpose(1, 2)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    leaves = [x, conv.weight] + ([conv.bias] if with_bias else [])
    for a, w in zip(torch.autograd.grad(got, leaves, grad), torch.autograd.grad(want, leaves, grad), strict=True):
        torch.testing.assert_close(a, w, rtol=1e-12, atol=1e-12)
