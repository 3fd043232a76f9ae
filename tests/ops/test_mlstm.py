"""The three mLSTM forms agree with each other and with plain float64 formulas written here from scratch.

The references below are loops over ``(t, j)`` taken from the math in backbones.md II.A, sharing no
code with :mod:`ssl_med.ops.mlstm`.
"""

from __future__ import annotations

import math

import pytest
import torch

from ssl_med.ops.mlstm import (
    auto_parallel_max_len,
    mlstm,
    mlstm_chunkwise,
    mlstm_initial_state,
    mlstm_parallel,
    mlstm_recurrent,
    mlstm_recurrent_step,
)

F64 = torch.float64


def random_inputs(
    length: int, b: int = 2, nh: int = 3, dh: int = 8, dv: int = 6, gate_scale: float = 1.0, seed: int = 0
) -> tuple[torch.Tensor, ...]:
    """q, k ``(B, NH, L, DH)``, v ``(B, NH, L, DV)``, gate pre-activations ``(B, NH, L)``, float64."""
    g = torch.Generator().manual_seed(seed)
    q, k = (torch.randn(b, nh, length, dh, generator=g, dtype=F64) for _ in range(2))
    v = torch.randn(b, nh, length, dv, generator=g, dtype=F64)
    i_pre = gate_scale * torch.randn(b, nh, length, generator=g, dtype=F64)
    f_pre = gate_scale * torch.randn(b, nh, length, generator=g, dtype=F64) + 3.0
    return q, k, v, i_pre, f_pre


def plain_mlstm(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    i_pre: torch.Tensor,
    f_pre: torch.Tensor,
    eps: float | None = None,
) -> torch.Tensor:
    """Loop form. ``eps=None``: unstabilised ``h_t = sum_j D_tj s_tj v_j / max(|sum_j D_tj s_tj|, 1)``.

    Otherwise the reference parallel stabilisation: ``m_t = max_j log D_tj`` and
    ``h_t = sum_j e^{log D_tj - m_t} s_tj v_j / (max(|...|, e^{-m_t}) + eps)``, with
    ``log D_tj = sum_{s=j+1..t} log sigmoid(f~_s) + i~_j`` and ``s_tj = q_t . k_j / sqrt(DH)``.
    """
    b, nh, length, dh = q.shape
    out = torch.zeros(b, nh, length, v.shape[-1], dtype=F64)
    log_f = -torch.log1p(torch.exp(-f_pre))  # log sigmoid, written out
    for t in range(length):
        log_d = torch.stack([log_f[..., j + 1 : t + 1].sum(-1) + i_pre[..., j] for j in range(t + 1)], -1)
        s = torch.stack([(q[..., t, :] * k[..., j, :]).sum(-1) / math.sqrt(dh) for j in range(t + 1)], -1)
        if eps is None:
            w = torch.exp(log_d) * s  # (B, NH, t+1)
            den = torch.clamp(w.sum(-1).abs(), min=1.0)
        else:
            m = log_d.max(-1).values
            w = torch.exp(log_d - m[..., None]) * s
            den = torch.maximum(w.sum(-1).abs(), torch.exp(-m)) + eps
        out[..., t, :] = (w[..., None] * v[..., : t + 1, :]).sum(-2) / den[..., None]
    return out


def test_parallel_matches_reference_formula_with_eps() -> None:
    args = random_inputs(13)
    torch.testing.assert_close(mlstm_parallel(*args), plain_mlstm(*args, eps=1e-6), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("form", ["parallel", "chunkwise", "recurrent"])
def test_every_form_matches_unstabilised_closed_form(form: str) -> None:
    """Without eps every stabiliser choice is exact; moderate gates keep the closed form finite."""
    args = random_inputs(11, seed=1)
    out = mlstm(*args, impl=form, chunk_size=4, eps=0.0)  # type: ignore[arg-type]
    torch.testing.assert_close(out, plain_mlstm(*args), rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("length", [1, 7, 33, 64, 100])
@pytest.mark.parametrize("chunk_size", [1, 8, 16, 64])
def test_forms_agree_forward(length: int, chunk_size: int) -> None:
    args = random_inputs(length, seed=length + chunk_size)
    rec = mlstm_recurrent(*args)
    chunk = mlstm_chunkwise(*args, chunk_size=chunk_size)
    # chunkwise and recurrent use the same stabiliser (m_0 = 0): equal including the eps term
    torch.testing.assert_close(chunk, rec, rtol=1e-10, atol=1e-10)
    # the parallel form's row-max stabiliser differs only in the eps term
    par0, chunk0 = mlstm_parallel(*args, eps=0.0), mlstm_chunkwise(*args, chunk_size=chunk_size, eps=0.0)
    torch.testing.assert_close(chunk0, par0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(mlstm_parallel(*args), rec, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize(("length", "chunk_size"), [(37, 8), (32, 16), (5, 64)])
@pytest.mark.parametrize("eps", [0.0, 1e-6])
def test_forms_agree_gradients(length: int, chunk_size: int, eps: float) -> None:
    base = random_inputs(length, seed=3)
    weight = torch.randn(base[2].shape, generator=torch.Generator().manual_seed(4), dtype=F64)

    def grads(fn: object) -> list[torch.Tensor]:
        args = [a.clone().requires_grad_(True) for a in base]
        (fn(*args) * weight).sum().backward()  # type: ignore[operator]
        return [a.grad for a in args]  # type: ignore[misc]

    g_rec = grads(lambda *a: mlstm_recurrent(*a, eps=eps))
    g_chunk = grads(lambda *a: mlstm_chunkwise(*a, chunk_size=chunk_size, eps=eps))
    g_par = grads(lambda *a: mlstm_parallel(*a, eps=eps))
    for gr, gc, gp in zip(g_rec, g_chunk, g_par):
        torch.testing.assert_close(gc, gr, rtol=1e-9, atol=1e-9)
        tol = 1e-9 if eps == 0.0 else 1e-4
        torch.testing.assert_close(gp, gr, rtol=tol, atol=tol)


def test_chunkwise_gradcheck() -> None:
    args = tuple(a.requires_grad_(True) for a in random_inputs(5, b=1, nh=1, dh=3, dv=2))
    assert torch.autograd.gradcheck(lambda *a: mlstm_chunkwise(*a, chunk_size=2), args)


def test_large_gates_parity() -> None:
    """Gate pre-activations of +-20 (and above): stabilised forms stay finite and equal."""
    q, k, v, i_pre, f_pre = random_inputs(150, gate_scale=20.0, seed=5)
    i_pre[..., ::17] = 80.0
    rec = mlstm_recurrent(q, k, v, i_pre, f_pre)
    for chunk_size in (16, 64):
        torch.testing.assert_close(mlstm_chunkwise(q, k, v, i_pre, f_pre, chunk_size=chunk_size), rec)
    torch.testing.assert_close(
        mlstm_parallel(q, k, v, i_pre, f_pre, eps=0.0), mlstm_recurrent(q, k, v, i_pre, f_pre, eps=0.0)
    )
    assert torch.isfinite(rec).all()


def test_no_overflow_at_16k_tokens() -> None:
    """L = 16384 in float32 with gate pre-activations whose plain exp overflows: finite forward/backward."""
    length, chunk = 16384, 64
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(1, 2, length, 4, generator=g) for _ in range(3))
    i_pre = 20.0 * torch.randn(1, 2, length, generator=g)
    i_pre[..., ::97] = 100.0
    f_pre = 20.0 * torch.randn(1, 2, length, generator=g)
    assert torch.isinf(torch.exp(i_pre)).any() and torch.isinf(torch.exp(i_pre.cumsum(-1))).any()
    leaves = [t.requires_grad_(True) for t in (q, k, v, i_pre, f_pre)]
    out = mlstm_chunkwise(*leaves, chunk_size=chunk)
    assert torch.isfinite(out).all()
    out.square().mean().backward()
    assert all(torch.isfinite(t.grad).all() for t in leaves)  # type: ignore[arg-type]
    # causal: a prefix of the output only depends on the prefix of the input. Gates this extreme
    # (|log f| ~ 40 per step) are ill-conditioned in float32 for any form built on cumulative
    # log-gates; the chunkwise form must be as accurate as the reference parallel form there.
    prefix = 600
    short = [t.detach()[:, :, :prefix] for t in leaves]
    with torch.no_grad():  # without eps the stabilisers (row max vs running max) cannot matter
        out_no_eps = mlstm_chunkwise(*leaves, chunk_size=chunk, eps=0.0)[:, :, :prefix]
        exact = mlstm_parallel(*(t.double() for t in short), eps=0.0)
        err_parallel32 = rel_error(mlstm_parallel(*short, eps=0.0), exact)
    assert rel_error(out_no_eps, exact) <= 1.5 * err_parallel32 + 1e-6
    # over the whole sequence, float32 chunkwise stays close to float64 chunkwise
    out64 = mlstm_chunkwise(*(t.detach().double() for t in leaves), chunk_size=chunk)
    assert rel_error(out.detach(), out64) < 3e-3


def rel_error(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64."""
    return float((a.double() - b).norm() / b.norm())


def test_recurrent_step_continues_a_sequence() -> None:
    """Two halves run back to back with the carried state equal the whole run."""
    q, k, v, i_pre, f_pre = random_inputs(10, seed=7)
    whole = mlstm_recurrent(q, k, v, i_pre, f_pre)
    state = mlstm_initial_state(q, v)
    outs = []
    for t in range(10):
        h, state = mlstm_recurrent_step(
            q[:, :, t], k[:, :, t], v[:, :, t], i_pre[:, :, t], f_pre[:, :, t], state
        )
        outs.append(h)
    torch.testing.assert_close(torch.stack(outs, 2), whole)
    assert state[0].shape == (2, 3, 8, 6) and state[1].shape == (2, 3, 8) and state[2].shape == (2, 3)


def test_auto_dispatch_and_gate_shapes() -> None:
    q, k, v, i_pre, f_pre = random_inputs(40, seed=8)
    short = mlstm(q, k, v, i_pre, f_pre, parallel_max_len=40)
    torch.testing.assert_close(short, mlstm_parallel(q, k, v, i_pre, f_pre), rtol=0, atol=0)
    long = mlstm(q, k, v, i_pre, f_pre, parallel_max_len=39, chunk_size=16)
    torch.testing.assert_close(long, mlstm_chunkwise(q, k, v, i_pre, f_pre, chunk_size=16), rtol=0, atol=0)
    # default threshold: max(chunk_size, 2 * head width) (DH = 8 here), where both forms cost the same
    assert auto_parallel_max_len(8, 64) == 64 and auto_parallel_max_len(192, 64) == 384
    torch.testing.assert_close(mlstm(q, k, v, i_pre, f_pre, chunk_size=64), short, rtol=0, atol=0)
    torch.testing.assert_close(mlstm(q, k, v, i_pre, f_pre, chunk_size=16), long, rtol=0, atol=0)
    # the reference's (B, NH, L, 1) gate layout is accepted
    torch.testing.assert_close(mlstm_parallel(q, k, v, i_pre[..., None], f_pre[..., None]), short)
    with pytest.raises(ValueError, match="gate pre-activations"):
        mlstm_parallel(q, k, v, i_pre[..., :-1], f_pre)
    with pytest.raises(ValueError, match="unknown mLSTM impl"):
        mlstm(q, k, v, i_pre, f_pre, impl="fused")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="chunk_size"):
        mlstm_chunkwise(q, k, v, i_pre, f_pre, chunk_size=0)
