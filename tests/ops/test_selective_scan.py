"""The selective scan: torch (chunked parallel) vs the sequential loop vs a closed-form oracle."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from ssl_med.ops.selective_scan import causal_conv1d, linear_scan, resolve_impl, selective_scan
from ssl_med.ops.selective_scan_fused import fused_available

F64 = torch.float64


def skip_unless_built(impl: str) -> None:
    """Skip a ``fused`` case when the C++ extension cannot be built here (no compiler, no ninja)."""
    if impl == "fused":
        from ssl_med.ops.selective_scan_fused import fused_status

        if not fused_available():
            pytest.skip(f"fused CPU kernel unavailable: {fused_status()}")


def closed_form(u, delta, A, B, C):
    """Independent oracle, no recurrence: h_t = sum_{s<=t} exp(sum_{s<r<=t} delta_r A) delta_s B_s u_s.

    u, delta (b, d, L); A (d, n); B, C (b, n, L). Returns y (b, d, L). O(L^2): small L only.
    """
    cum = torch.cumsum(delta[..., None] * A[:, None, :], dim=2)  # (b, d, L, n)
    diff = cum[:, :, :, None, :] - cum[:, :, None, :, :]  # (b, d, t, s, n)
    L = u.shape[-1]
    causal = torch.ones(L, L, dtype=torch.bool).tril()[None, None, :, :, None]
    weight = torch.where(causal, torch.exp(diff.clamp(max=0)), torch.zeros_like(diff))
    drive = (delta * u)[..., None] * B.transpose(1, 2)[:, None]  # (b, d, s, n)
    h = (weight * drive[:, :, None]).sum(3)  # (b, d, t, n)
    return (h * C.transpose(1, 2)[:, None]).sum(-1)


def make_inputs(L, b=2, d=3, n=4, bc="variable", dtype=F64, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = 4 if bc == "grouped" else d  # two groups of two channels
    u = torch.randn(b, d, L, generator=g, dtype=dtype)
    delta = 0.5 * torch.rand(b, d, L, generator=g, dtype=dtype)
    A = -0.5 - torch.rand(d, n, generator=g, dtype=dtype)
    shape = {"variable": (b, n, L), "constant": (d, n), "grouped": (b, 2, n, L)}[bc]
    B = torch.randn(*shape, generator=g, dtype=dtype)
    C = torch.randn(*shape, generator=g, dtype=dtype)
    extras = {
        "D": torch.randn(d, generator=g, dtype=dtype),
        "z": torch.randn(b, d, L, generator=g, dtype=dtype),
        "delta_bias": torch.rand(d, generator=g, dtype=dtype) - 0.5,
    }
    return [u, delta, A, B, C], extras


@pytest.mark.parametrize("L", [1, 5, 40])
def test_ref_and_torch_match_closed_form(L: int) -> None:
    (u, delta, A, B, C), _ = make_inputs(L)
    expected = closed_form(u, delta, A, B, C)
    for impl in ("ref", "torch", "fused"):
        if impl == "fused" and not fused_available():
            continue  # the C++ extension cannot be built here; the fused tests say why
        torch.testing.assert_close(selective_scan(u, delta, A, B, C, impl=impl), expected, rtol=1e-10, atol=1e-10)


CASES = [
    (1, "variable", dict(D=True, z=True, delta_bias=True, delta_softplus=True, return_last_state=True)),
    (7, "variable", dict(D=False, z=False, delta_bias=False, delta_softplus=False, return_last_state=False)),
    (33, "constant", dict(D=True, z=False, delta_bias=True, delta_softplus=True, return_last_state=True)),
    (128, "grouped", dict(D=False, z=True, delta_bias=False, delta_softplus=True, return_last_state=False)),
    (301, "variable", dict(D=True, z=True, delta_bias=False, delta_softplus=False, return_last_state=True)),
    (2048, "variable", dict(D=True, z=True, delta_bias=True, delta_softplus=True, return_last_state=True)),
]


@pytest.mark.parametrize("impl", ["torch", "fused"])
@pytest.mark.parametrize(("L", "bc", "opts"), CASES)
def test_torch_matches_ref_forward_and_gradients(L: int, bc: str, opts: dict, impl: str) -> None:
    skip_unless_built(impl)
    tensors, extras = make_inputs(L, bc=bc, b=1 if L > 1000 else 2)
    kwargs = {k: (extras[k] if opts[k] else None) for k in ("D", "z", "delta_bias")}
    flags = {k: opts[k] for k in ("delta_softplus", "return_last_state")}
    leaves = [t.requires_grad_() for t in tensors] + [v.requires_grad_() for v in kwargs.values() if v is not None]
    results = {}
    for which in (impl, "ref"):
        res = selective_scan(*tensors, **kwargs, **flags, impl=which)
        out, last = res if opts["return_last_state"] else (res, None)
        loss = (out * torch.cos(out)).sum() + (last.square().sum() if last is not None else 0)
        results[which] = (out, last, torch.autograd.grad(loss, leaves))
    (o1, l1, g1), (o2, l2, g2) = results[impl], results["ref"]
    torch.testing.assert_close(o1, o2, rtol=1e-10, atol=1e-10)
    if last is not None:
        torch.testing.assert_close(l1, l2, rtol=1e-10, atol=1e-10)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9 * max(1.0, b.abs().max().item()))


@pytest.mark.parametrize("chunk", [2, 3, 16, 64, 500])
def test_chunk_size_does_not_change_results(chunk: int) -> None:
    (u, delta, A, B, C), ex = make_inputs(250)
    expected = selective_scan(u, delta, A, B, C, **ex, impl="ref")
    got = selective_scan(u, delta, A, B, C, **ex, impl="torch", chunk=chunk)
    torch.testing.assert_close(got, expected, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("impl", ["torch", "fused"])
def test_long_sequence_is_stable_and_exact(impl: str) -> None:
    """L = 16384 with large steps (cumulative decays far below float range): finite and equal to the loop."""
    skip_unless_built(impl)
    L = 16384
    (u, delta, A, B, C), _ = make_inputs(L, b=1, d=2, n=4, seed=3)
    A = -torch.arange(1, 5, dtype=F64).repeat(2, 1)
    bias = torch.full((2,), 5.0, dtype=F64)
    out, last = selective_scan(u, delta, A, B, C, delta_bias=bias, delta_softplus=True, return_last_state=True, impl=impl)
    ref, ref_last = selective_scan(u, delta, A, B, C, delta_bias=bias, delta_softplus=True, return_last_state=True, impl="ref")
    assert torch.isfinite(out).all() and torch.isfinite(last).all()
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(last, ref_last, rtol=1e-10, atol=1e-10)
    # float32 with slow decays (products of 16k factors underflow): finite, close to float64
    slow = torch.full((2,), -4.0, dtype=F64)
    args32 = [t.float() for t in (u, delta, A / 16, B, C)]
    out32 = selective_scan(*args32, delta_bias=slow.float(), delta_softplus=True, impl=impl)
    out64 = selective_scan(u, delta, A / 16, B, C, delta_bias=slow, delta_softplus=True, impl="ref")
    assert torch.isfinite(out32).all()
    torch.testing.assert_close(out32.double(), out64, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("impl", ["torch", "fused"])
def test_low_precision_inputs_keep_their_dtype(impl: str) -> None:
    skip_unless_built(impl)
    (u, delta, A, B, C), ex = make_inputs(64, dtype=torch.float32)
    u, delta, B, C = (t.bfloat16() for t in (u, delta, B, C))
    expected = selective_scan(u.float(), delta.float(), A, B.float(), C.float(), **ex, impl="ref")
    got = selective_scan(u, delta, A, B, C, **ex, impl=impl)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected, rtol=3e-2, atol=5e-2)


@pytest.mark.parametrize("impl", ["torch", "fused"])
def test_last_state_alone_has_gradients(impl: str) -> None:
    skip_unless_built(impl)
    tensors, _ = make_inputs(20)
    u = tensors[0].requires_grad_()
    grads = []
    for which in (impl, "ref"):
        _, last = selective_scan(*tensors, return_last_state=True, impl=which)
        grads.append(torch.autograd.grad(last.sum(), u)[0])
    torch.testing.assert_close(grads[0], grads[1])


def test_linear_scan_equals_a_loop() -> None:
    a, b = torch.rand(3, 37, 2, dtype=F64), torch.randn(3, 37, 2, dtype=F64)
    h, states = torch.zeros(3, 2, dtype=F64), []
    for t in range(37):
        h = a[:, t] * h + b[:, t]
        states.append(h)
    torch.testing.assert_close(linear_scan(a.clone(), b.clone(), chunk=4), torch.stack(states, 1))
    with pytest.raises(ValueError, match="chunk"):
        linear_scan(a, b, chunk=1)


def test_causal_conv1d_matches_padded_conv() -> None:
    x, w, bias = torch.randn(2, 5, 11), torch.randn(5, 4), torch.randn(5)
    full = F.conv1d(x, w[:, None], bias, padding=3, groups=5)[..., :11]
    torch.testing.assert_close(causal_conv1d(x, w, bias), full)
    torch.testing.assert_close(causal_conv1d(x, w[:, None], bias, activation="silu"), F.silu(full))
    y = x.clone()
    y[..., 6:] += 1.0  # the future does not leak into the past
    torch.testing.assert_close(causal_conv1d(y, w, bias)[..., :6], full[..., :6])


def test_causal_conv1d_silu_recomputes_in_backward_with_the_same_gradients() -> None:
    """The SiLU conv saves only its input; its gradients equal autograd's through pad + conv + silu,
    and a token-major input (a transposed (B, L, D) tensor) gives a token-major output."""
    g = torch.Generator().manual_seed(0)
    base = torch.randn(2, 11, 5, generator=g, dtype=F64)  # (B, L, D)
    w, bias = torch.randn(5, 4, generator=g, dtype=F64), torch.randn(5, generator=g, dtype=F64)
    grad = torch.randn(2, 5, 11, generator=g, dtype=F64)
    results = []
    for fused in (True, False):
        leaves = [t.clone().requires_grad_() for t in (base, w, bias)]
        x = leaves[0].transpose(1, 2)
        if fused:
            out = causal_conv1d(x, leaves[1], leaves[2], activation="silu")
            assert out.stride(1) == 1  # token-major, as its input
        else:
            out = F.silu(F.conv1d(F.pad(x, (3, 0)), leaves[1][:, None], leaves[2], groups=5))
        results.append((out, torch.autograd.grad(out, leaves, grad)))
    torch.testing.assert_close(results[0][0], results[1][0])
    for a, b in zip(results[0][1], results[1][1], strict=True):
        torch.testing.assert_close(a, b)


def test_causal_conv1d_silu_backward_under_bf16_autocast() -> None:
    """The recompute in the backward runs under the forward's autocast state (bf16 conv, float32 weights)."""
    x = torch.randn(2, 11, 6).transpose(1, 2).requires_grad_()
    w, bias = torch.randn(6, 4, requires_grad=True), torch.randn(6, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = causal_conv1d(x, w, bias, activation="silu")
    assert out.dtype == torch.bfloat16
    out.float().square().sum().backward()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain = F.silu(F.conv1d(F.pad(x, (3, 0)), w[:, None], bias, groups=6))
    expected = torch.autograd.grad(plain.float().square().sum(), (x, w, bias))
    for got, want in zip((x.grad, w.grad, bias.grad), expected, strict=True):
        torch.testing.assert_close(got, want)


def test_impl_resolution_on_cpu() -> None:
    assert resolve_impl("auto", torch.device("cpu")) == ("fused" if fused_available() else "torch")
    (u, delta, A, B, C), _ = make_inputs(4)
    with pytest.raises(RuntimeError, match="cuda"):
        selective_scan(u, delta, A, B, C, impl="cuda")
    with pytest.raises(ValueError, match="unknown scan impl"):
        selective_scan(u, delta, A, B, C, impl="fast")  # type: ignore[arg-type]


def test_causal_conv1d_passes_activation_by_keyword_to_the_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    """causal-conv1d >= 1.4 takes ``seq_idx`` fourth: the activation must travel as a keyword."""
    import ssl_med.ops.selective_scan as ops

    calls = {}

    def kernel(x, weight, bias=None, seq_idx=None, initial_states=None, return_final_states=False,
               final_states_out=None, activation=None):  # causal_conv1d_fn's signature (1.6)
        calls.update(seq_idx=seq_idx, activation=activation)
        return x

    class CudaLike(torch.Tensor):
        is_cuda = True

    monkeypatch.setattr(ops, "_causal_conv1d_kernel", lambda: kernel)
    x = torch.randn(1, 2, 5).as_subclass(CudaLike)
    ops.causal_conv1d(x, torch.randn(2, 4), torch.randn(2), activation="silu")
    assert calls == {"seq_idx": None, "activation": "silu"}
