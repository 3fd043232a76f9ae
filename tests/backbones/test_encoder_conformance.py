"""One conformance test of the encoder interface, parametrised over every registered backbone, 2D and 3D.

Every backbone must accept the common constructor arguments ``spatial_dims, in_chans, img_size,
patch_size, embed_dim, depth`` (see TINY below) and honour ``mask=``, ``keep_idx=``,
``return_layers=`` and other input sizes.
"""

from __future__ import annotations

import pytest
import torch

from ssl_med.encoder import Encoder, EncoderOutput
from ssl_med.registry import BACKBONES

TINY = {"embed_dim": 48, "depth": 2, "patch_size": 4, "img_size": 16}
CHANNEL_ADAPTIVE = {"chada_vit"}
#: backbone options that change the token sequence, tested as backbones of their own: ``name[variant]``
VARIANTS = {"vit[per_modality]": ("vit", {"channel_tokens": "per_modality"})}


def build(name: str, spatial_dims: int) -> Encoder:
    torch.manual_seed(0)
    name, options = VARIANTS.get(name, (name, {}))
    kwargs = dict(TINY, spatial_dims=spatial_dims, **options)
    if name not in CHANNEL_ADAPTIVE:
        kwargs["in_chans"] = 2
    return BACKBONES.build(name, **kwargs).eval()


def inputs(spatial_dims: int, size: int = 16, batch: int = 2) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(batch, 2, *([size] * spatial_dims))


CASES = [(name, d) for name in [*BACKBONES.names(), *VARIANTS] for d in (2, 3)]


@pytest.mark.parametrize(("name", "spatial_dims"), CASES)
def test_output_shapes(name: str, spatial_dims: int) -> None:
    enc = build(name, spatial_dims)
    assert isinstance(enc, Encoder)
    out = enc(inputs(spatial_dims), return_layers=(0, -1))
    n = 4**spatial_dims
    assert isinstance(out, EncoderOutput)
    assert out.grid == (4,) * spatial_dims
    assert out.pooled.shape == (2, 48)
    assert out.patch_tokens.shape == (2, n, 48)
    assert len(out.hidden_states) == 2 and all(h.shape == (2, n, 48) for h in out.hidden_states)
    assert torch.isfinite(out.pooled).all() and torch.isfinite(out.patch_tokens).all()
    assert enc.spatial_dims == spatial_dims and enc.embed_dim == 48 and enc.depth == 2


@pytest.mark.parametrize(("name", "spatial_dims"), CASES)
def test_other_input_size(name: str, spatial_dims: int) -> None:
    enc = build(name, spatial_dims)
    out = enc(inputs(spatial_dims, size=8))
    assert out.grid == (2,) * spatial_dims
    assert out.patch_tokens.shape == (2, 2**spatial_dims, 48)


@pytest.mark.parametrize(("name", "spatial_dims"), CASES)
def test_mask_token_replacement(name: str, spatial_dims: int) -> None:
    enc = build(name, spatial_dims)
    x = inputs(spatial_dims)
    n = 4**spatial_dims
    mask = torch.zeros(2, n, dtype=torch.bool)
    mask[:, : n // 2] = True
    with torch.no_grad():
        enc.mask_token.normal_()
        full, masked = enc(x), enc(x, mask=mask)
    assert masked.patch_tokens.shape == full.patch_tokens.shape
    assert not torch.allclose(masked.patch_tokens, full.patch_tokens)
    # replacing tokens with the mask token makes the output independent of the masked content
    x2 = x.clone()
    x2[..., : x.shape[-1] // 2] += 5.0  # changes some patches; mask everything to compare
    all_masked = torch.ones(2, n, dtype=torch.bool)
    with torch.no_grad():
        a, b = enc(x, mask=all_masked), enc(x2, mask=all_masked)
    torch.testing.assert_close(a.patch_tokens, b.patch_tokens)


@pytest.mark.parametrize(("name", "spatial_dims"), CASES)
def test_visible_only_forward(name: str, spatial_dims: int) -> None:
    enc = build(name, spatial_dims)
    x = inputs(spatial_dims)
    n = 4**spatial_dims
    keep = torch.stack([torch.randperm(n)[: n // 4].sort().values for _ in range(2)])
    out = enc(x, keep_idx=keep, return_layers=(-1,))
    assert out.patch_tokens.shape == (2, n // 4, 48)
    assert out.hidden_states[0].shape == (2, n // 4, 48)
    # kept tokens do not depend on the content of dropped patches
    dropped_all = torch.ones(2, n, dtype=torch.bool)
    dropped_all.scatter_(1, keep, False)
    assert dropped_all.sum() == 2 * (n - n // 4)


@pytest.mark.parametrize(("name", "spatial_dims"), CASES)
def test_gradients_flow(name: str, spatial_dims: int) -> None:
    enc = build(name, spatial_dims).train()
    out = enc(inputs(spatial_dims))
    (out.pooled.square().mean() + out.patch_tokens.square().mean()).backward()
    grads = [p.grad for n_, p in enc.named_parameters() if p.requires_grad and "mask_token" not in n_]
    assert all(g is not None for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize(("name", "spatial_dims"), CASES)
def test_activation_checkpointing_changes_nothing(name: str, spatial_dims: int) -> None:
    """set_grad_checkpointing: same outputs and parameter gradients (visible-only forward, kept hidden states)."""
    enc = build(name, spatial_dims).train()
    x = inputs(spatial_dims)
    keep = torch.tensor([[0, 3, 5, 9], [1, 2, 7, 8]])
    calls = []  # each block runs again in the backward only when checkpointing
    for i, block in enumerate(enc.blocks):
        block.forward = lambda *a, i=i, f=block.forward, **k: calls.append(i) or f(*a, **k)
    results = []
    for enable in (False, True):
        enc.set_grad_checkpointing(enable)
        enc.zero_grad()
        calls.clear()
        out = enc(x, keep_idx=keep, return_layers=(0,))
        (out.pooled.square().sum() + out.patch_tokens.sum() + out.hidden_states[0].square().sum()).backward()
        assert sorted(calls) == ([0, 0, 1, 1] if enable else [0, 1])
        results.append((out.pooled.detach(), {n: p.grad.clone() for n, p in enc.named_parameters() if p.grad is not None}))
    (pooled_a, grads_a), (pooled_b, grads_b) = results
    torch.testing.assert_close(pooled_b, pooled_a)
    assert grads_a.keys() == grads_b.keys() and grads_a
    for n in grads_a:
        torch.testing.assert_close(grads_b[n], grads_a[n], msg=n)


def test_bad_input_shape_is_a_clear_error() -> None:
    enc = build("vit", 2)
    with pytest.raises(ValueError, match="multiple of the patch"):
        enc(torch.randn(1, 2, 15, 16))
    with pytest.raises(ValueError, match="input channels"):
        enc(torch.randn(1, 3, 16, 16))
