"""Shared layers against plain reference computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ssl_med.layers import (
    Attention,
    Block,
    attention,
    patchify,
    resample_pos_embed,
    sincos_pos_embed,
    unpatchify,
)
from ssl_med.layers.attention import pack_padded, unpack_padded


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


def _ragged_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    x = torch.randn(3, 6, 16, dtype=torch.float64)
    pad = torch.tensor([[False] * 6, [False, True, False, True, False, False], [False, False] + [True] * 4])
    return x, pad


def test_pack_unpack_roundtrip() -> None:
    x, pad = _ragged_batch()
    packed, seqlens, index = pack_padded(x, pad)
    assert packed.shape == (1, int((~pad).sum()), 16) and seqlens == [6, 4, 2]
    torch.testing.assert_close(packed[0, 6:10], x[1][~pad[1]])  # image after image, order kept
    back = unpack_padded(packed, index, 3, 6)
    torch.testing.assert_close(back, x.masked_fill(pad[..., None], 0.0))


@pytest.mark.parametrize("impl", ["sdpa", "math"])
def test_packed_attention_equals_padded(impl: str) -> None:
    """Block-diagonal attention over the packed sequence == key-padding attention on the valid tokens."""
    x, pad = _ragged_batch()
    attn = Attention(16, 4, attn_impl=impl).double()
    padded = attn(x, key_padding_mask=pad)
    packed, seqlens, index = pack_padded(x, pad)
    out = unpack_padded(attn(packed, seqlens=seqlens), index, 3, 6)
    valid = ~pad
    torch.testing.assert_close(out[valid], padded[valid])
    # and each image alone, without any padding
    for b in range(3):
        torch.testing.assert_close(padded[b][valid[b]], attn(x[b : b + 1, valid[b]])[0])


def test_packed_attention_checks_shapes() -> None:
    q = torch.randn(1, 2, 5, 4)
    with pytest.raises(ValueError, match="sum\\(seqlens\\)"):
        attention(q, q, q, impl="sdpa", seqlens=[2, 2])
    with pytest.raises(ValueError, match="not both"):
        attention(q, q, q, torch.zeros(1, 5, dtype=torch.bool), impl="sdpa", seqlens=[5])


def test_block_padding_and_packing_and_drop_path() -> None:
    x, pad = _ragged_batch(1)
    block = Block(16, 4, drop_path=0.5, init_values=0.1).double().eval()
    padded = block(x, key_padding_mask=pad)
    packed, seqlens, index = pack_padded(x, pad)
    out = unpack_padded(block(packed, seqlens=seqlens), index, 3, 6)
    torch.testing.assert_close(out[~pad], padded[~pad])
    # training: stochastic depth drops whole images (segments) of a packed sequence, never parts of one;
    # an image whose two branches were both dropped comes out unchanged
    block.train()
    torch.manual_seed(3)
    unchanged = []
    for _ in range(8):
        o = unpack_padded(block(packed, seqlens=seqlens), index, 3, 6)
        assert torch.isfinite(o).all()
        unchanged.append([torch.allclose(o[b][~pad[b]], x[b][~pad[b]]) for b in range(3)])
    assert any(any(u) and not all(u) for u in unchanged)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="xformers kernels need CUDA")
def test_xformers_matches_sdpa_on_cuda() -> None:
    import importlib.util

    if importlib.util.find_spec("xformers") is None:
        pytest.skip("xformers not installed")
    x, pad = _ragged_batch()
    x, pad = x.float().cuda(), pad.cuda()
    attn = Attention(16, 4, attn_impl="sdpa").cuda()
    ref = attn(x, key_padding_mask=pad)
    attn.attn_impl = "xformers"
    torch.testing.assert_close(attn(x, key_padding_mask=pad)[~pad], ref[~pad], atol=1e-4, rtol=1e-4)
    packed, seqlens, index = pack_padded(x, pad)
    out = unpack_padded(attn(packed, seqlens=seqlens), index, 3, 6)
    torch.testing.assert_close(out[~pad], ref[~pad], atol=1e-4, rtol=1e-4)
