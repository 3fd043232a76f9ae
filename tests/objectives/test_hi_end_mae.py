"""Hi-End-MAE: loss and cross-attention against plain float64 loops, level routing, learning (2D), 3D smoke."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils.data import DataLoader, default_collate

from objectives.hi_end_mae import CrossAttention, HiEndMAE, default_levels, hi_end_mae_loss
from ssl_med.data.crops import RandomCropDataset
from ssl_med.registry import BACKBONES, OBJECTIVES


def tiny_vit(spatial_dims: int = 2, depth: int = 2) -> torch.nn.Module:
    return BACKBONES.build(
        "vit", spatial_dims=spatial_dims, in_chans=1, img_size=32, patch_size=8, embed_dim=48, depth=depth
    )


def ref_loss(pred: torch.Tensor, patches: torch.Tensor, mask: torch.Tensor, norm_pix: bool) -> float:
    """Reference: MSE over masked patches, targets LayerNorm'ed per patch (biased var, eps 1e-6)."""
    total, count = 0.0, 0
    for b in range(pred.shape[0]):
        for n in range(pred.shape[1]):
            if not mask[b, n]:
                continue
            x = patches[b, n].double().tolist()
            if norm_pix:
                mean = sum(x) / len(x)
                var = sum((v - mean) ** 2 for v in x) / len(x)
                x = [(v - mean) / math.sqrt(var + 1e-6) for v in x]
            y = pred[b, n].double().tolist()
            total += sum((a - c) ** 2 for a, c in zip(y, x))
            count += len(x)
    return total / count


@pytest.mark.parametrize("norm_pix", [True, False])
def test_loss_matches_reference(norm_pix: bool) -> None:
    g = torch.Generator().manual_seed(0)
    pred, patches = torch.randn(3, 5, 8, generator=g), torch.rand(3, 5, 8, generator=g)
    mask = torch.rand(3, 5, generator=g) > 0.4
    mask[0, 0] = True
    loss = hi_end_mae_loss(pred, patches, mask, norm_pix)
    assert loss.item() == pytest.approx(ref_loss(pred, patches, mask, norm_pix), rel=1e-5)


def test_cross_attention_matches_reference() -> None:
    torch.manual_seed(0)
    ca = CrossAttention(8, num_heads=2).double()
    x, y = torch.randn(2, 3, 8, dtype=torch.float64), torch.randn(2, 4, 8, dtype=torch.float64)
    out = ca(x, y).detach()
    with torch.no_grad():
        q, kv = ca.q(x), ca.kv(y)
        k, v = kv[..., :8], kv[..., 8:]
    ref = torch.zeros(2, 3, 8, dtype=torch.float64)
    for b in range(2):
        for h in range(2):
            sl = slice(4 * h, 4 * h + 4)
            for i in range(3):
                scores = [float(q[b, i, sl] @ k[b, j, sl]) / 2.0 for j in range(4)]  # / sqrt(4)
                m = max(scores)
                w = [math.exp(s - m) for s in scores]
                z = sum(w)
                ref[b, i, sl] = sum(w[j] / z * v[b, j, sl] for j in range(4))
    with torch.no_grad():
        torch.testing.assert_close(out, ca.proj(ref))


def test_default_levels() -> None:
    assert default_levels(12) == (3, 6, 9)
    assert default_levels(24) == (6, 12, 18)
    obj = HiEndMAE(tiny_vit(depth=8), decoder_dim=24, decoder_heads=2, levels=(1, 5, 3))
    assert obj.levels == (5, 3, 1)  # deep -> shallow


def test_decoder_queries_levels_deep_to_shallow() -> None:
    torch.manual_seed(0)
    encoder = tiny_vit(depth=8)
    obj = HiEndMAE(encoder, decoder_dim=24, decoder_heads=2)
    assert obj.levels == (6, 4, 2)
    images = torch.rand(2, 1, 32, 32)
    noise = torch.rand(2, 16)
    seen: list[torch.Tensor] = []
    hooks = [p.register_forward_hook(lambda _m, inp, _o: seen.append(inp[0])) for p in obj.decoder.level_embed]
    out = obj({"image": images}, noise=noise)
    for h in hooks:
        h.remove()
    keep = noise.argsort(dim=1)[:, :4].sort(dim=1).values
    hidden = encoder(images, keep_idx=keep, return_layers=(6, 4, 2)).hidden_states
    assert len(seen) == 3
    for got, want in zip(seen, hidden):
        torch.testing.assert_close(got, want)
    again = obj({"image": images}, noise=noise)  # injected noise fixes the masking
    torch.testing.assert_close(out.loss, again.loss)
    assert out.embeddings.shape == (2, 48)


def test_views_keep_shape_and_preview() -> None:
    obj = HiEndMAE(tiny_vit(), decoder_dim=24, decoder_heads=2, views={"rotate90_prob": 1.0})
    views = obj.view_transform()
    sample = views({"image": torch.rand(1, 32, 32)})
    assert sample["image"].shape == (1, 32, 32) and type(sample["image"]) is torch.Tensor
    assert views({"image": torch.rand(1, 32, 16)})["image"].shape == (1, 32, 16)  # not square: no rotation
    batch = default_collate([views({"image": torch.rand(1, 32, 32)}) for _ in range(2)])
    previews = obj.preview(batch)
    assert set(previews) == {"input", "masked", "reconstruction"}
    assert all(v.shape == (2, 1, 32, 32) for v in previews.values())


def test_hi_end_mae_learns_on_demo_crops(demo_store_2d: str, fit_objective) -> None:
    torch.manual_seed(0)
    obj = OBJECTIVES.build("hi_end_mae", encoder=tiny_vit(), decoder_dim=48, decoder_heads=4)
    data = RandomCropDataset(demo_store_2d, crop_size=(32, 32), transform=obj.view_transform(), length=10_000)
    loader = DataLoader(data, batch_size=16, num_workers=0)
    opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.05)
    losses, embeddings = fit_objective(obj, loader, 30, opt)
    stds = [e.std(dim=0).mean().item() for e in embeddings]
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    assert min(stds[-5:]) > 0.02  # no collapse


def test_hi_end_mae_3d_smoke(demo_store_3d: str) -> None:
    torch.manual_seed(0)
    obj = OBJECTIVES.build("hi_end_mae", encoder=tiny_vit(3), decoder_dim=48, decoder_heads=4)
    data = RandomCropDataset(demo_store_3d, crop_size=(32, 32, 32), transform=obj.view_transform(), length=4)
    batch = next(iter(DataLoader(data, batch_size=2)))
    out = obj(batch)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(p.grad is not None for p in obj.decoder.level_embed.parameters())
    assert obj.preview(batch)["reconstruction"].shape == (2, 1, 32, 32, 32)
