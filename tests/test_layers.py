"""Shared layers against plain reference computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ssl_med.layers import Attention, attention, patchify, resample_pos_embed, sincos_pos_embed, unpatchify


@pytest.mark.parametrize("spatial", [(8, 12), (4, 8, 12)])
def test_patchify_matches_loop_and_roundtrips(spatial: tuple[int, ...]) -> None:
    p = (2,) * len(spatial) if len(spatial) == 3 else (4, 2)
    x = torch.randn(2, 3, *spatial)
    tokens = patchify(x, p)
    grid = [s // q for s, q in zip(spatial, p)]
    # reference: walk the grid in raster order, flatten each patch as (pixels..., channel)
    ref = []
    for idx in np.ndindex(*grid):
        sl = tuple(slice(i * q, (i + 1) * q) for i, q in zip(idx, p))
        patch = x[(slice(None), slice(None), *sl)]  # (B, C, *p)
        ref.append(patch.movedim(1, -1).reshape(2, -1))
    torch.testing.assert_close(tokens, torch.stack(ref, dim=1))
    torch.testing.assert_close(unpatchify(tokens, grid, p, 3), x)


def test_sincos_2d_matches_mae_formula() -> None:
    h, w, d = 3, 4, 16
    emb = sincos_pos_embed((h, w), d).double()
    quarter = d // 4
    omega = 1.0 / 10000 ** (np.arange(quarter) / quarter)
    for i in range(h):
        for j in range(w):
            expect = np.concatenate(
                [np.sin(j * omega), np.cos(j * omega), np.sin(i * omega), np.cos(i * omega)]
            )  # first half encodes the column, second half the row
            np.testing.assert_allclose(emb[i * w + j].numpy(), expect, atol=1e-6)


def test_sincos_3d_distinct_and_shaped() -> None:
    emb = sincos_pos_embed((2, 3, 4), 48)
    assert emb.shape == (24, 48)
    assert torch.cdist(emb, emb).add(torch.eye(24) * 10).min() > 1e-3  # all positions distinct


def test_resample_identity_and_shape() -> None:
    pos = torch.randn(1, 16, 8)
    assert resample_pos_embed(pos, (4, 4), (4, 4)) is pos
    assert resample_pos_embed(pos, (4, 4), (2, 6)).shape == (1, 12, 8)
    pos3 = torch.randn(1, 8, 8)
    assert resample_pos_embed(pos3, (2, 2, 2), (3, 3, 3)).shape == (1, 27, 8)
    const = torch.ones(1, 16, 8)  # a constant table stays constant
    torch.testing.assert_close(resample_pos_embed(const, (4, 4), (6, 6)), torch.ones(1, 36, 8))


def test_attention_sdpa_equals_math_with_padding() -> None:
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 3, 5, 4, dtype=torch.float64) for _ in range(3))
    pad = torch.tensor([[False] * 5, [False, False, False, True, True]])
    out_sdpa = attention(q, k, v, pad, impl="sdpa")
    out_math = attention(q, k, v, pad, impl="math")
    torch.testing.assert_close(out_sdpa, out_math)
    # the plain formula, with padded keys removed entirely
    ref = []
    for b in range(2):
        keep = ~pad[b]
        s = q[b] @ k[b][:, keep].transpose(-1, -2) / math.sqrt(4)
        ref.append(s.softmax(-1) @ v[b][:, keep])
    torch.testing.assert_close(out_math, torch.stack(ref))


def test_attention_module_and_bad_impl() -> None:
    attn = Attention(16, 4, attn_impl="sdpa")
    x = torch.randn(2, 7, 16)
    y = attn(x)
    attn.attn_impl = "math"
    torch.testing.assert_close(attn(x), y, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="unknown attn_impl"):
        attention(x[:, None], x[:, None], x[:, None], impl="flash9")


def test_xformers_missing_is_a_clear_error() -> None:
    import importlib.util

    if importlib.util.find_spec("xformers") is not None:
        pytest.skip("xformers installed")
    q = torch.randn(1, 1, 3, 4)
    with pytest.raises(ImportError, match=r"ssl_med\[cuda\]"):
        attention(q, q, q, impl="xformers")
