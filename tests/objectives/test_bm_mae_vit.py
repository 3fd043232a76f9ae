"""objective=bm_mae with the plain ViT (``backbone.channel_tokens=per_modality``: one patch kernel and
embedding per sequence, BM-MAE's own tokenisers): a training step in 2D and 3D, the loss falls on a
fixed batch, modality dropout and held-out synthesis, the encoder on a subset of sequences, and the
config wiring of ``backbone=vit objective=bm_mae``."""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_module

from objectives.bm_mae import BMMAE
from ssl_med.data.channels import encoder_channel_kwargs
from ssl_med.registry import BACKBONES, OBJECTIVES


def tiny(spatial_dims: int, size: int, patch: int) -> BMMAE:
    encoder = BACKBONES.build(
        "vit", spatial_dims=spatial_dims, in_chans=4, img_size=size, patch_size=patch, embed_dim=48, depth=2,
        num_heads=3, channel_tokens="per_modality",
    )  # fmt: skip
    return OBJECTIVES.build("bm_mae", encoder=encoder, in_chans=4, decoder_dim=32, decoder_depth=1, decoder_heads=2)


def sequences(batch: int, spatial_dims: int, size: int, seed: int = 0) -> torch.Tensor:
    """``(B, 4, *S)`` in [0, 1]: four "sequences" of one smooth anatomy, each its own contrast (two of
    them inverted), as T1/T1ce/T2/FLAIR are of one brain."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 1, *(4,) * spatial_dims, generator=g)
    mode = "bilinear" if spatial_dims == 2 else "trilinear"
    field = torch.nn.functional.interpolate(coarse, size=(size,) * spatial_dims, mode=mode, align_corners=False)
    gain = torch.tensor([0.8, 0.6, -0.7, -0.5]).reshape(1, 4, *(1,) * spatial_dims)
    offset = torch.tensor([0.1, 0.2, 0.8, 0.7]).reshape(1, 4, *(1,) * spatial_dims)
    return (gain * field + offset + 0.02 * torch.rand(batch, 4, *(size,) * spatial_dims, generator=g)).clamp(0, 1)


@pytest.mark.parametrize(("spatial_dims", "size", "patch"), [(2, 16, 4), (3, 16, 8)])
def test_trains_a_step_with_modality_dropout(spatial_dims: int, size: int, patch: int) -> None:
    torch.manual_seed(0)
    obj = tiny(spatial_dims, size, patch)
    kept = torch.tensor([[1, 1, 1, 1], [1, 0, 1, 0]], dtype=torch.bool)
    batch = {"image": sequences(2, spatial_dims, size), "channel_mask": kept}
    assert torch.equal(encoder_channel_kwargs(obj.encoder, batch)["channel_padding_mask"], ~kept)
    grid = obj.encoder.grid_shape(batch["image"].shape[2:])
    torch.manual_seed(1)
    keep, _ = obj.draw_masks(kept, grid)
    torch.manual_seed(1)  # the same draws in the step
    out = obj(batch)
    assert torch.isfinite(out.loss) and set(out.terms) == {"bm_mae", "recon_c0", "recon_c1", "recon_c2", "recon_c3"}
    out.loss.backward()
    modality = keep // keep.new_tensor(grid).prod()  # (B, K): the modality of each visible token
    assert not ((modality[1] == 1) | (modality[1] == 3)).any()  # dropped sequences are never visible
    visible = torch.zeros(4, dtype=torch.bool)
    visible[modality.unique()] = True
    kernel = obj.encoder.patch_embed.proj.weight.grad.reshape(4, -1)  # one kernel per modality
    assert torch.equal(kernel.abs().sum(dim=1) > 0, visible)
    assert torch.equal(obj.encoder.modality_embed.grad.abs().sum(dim=1) > 0, visible)


def test_loss_falls_on_a_fixed_batch() -> None:
    torch.manual_seed(0)
    obj = tiny(2, 16, 4)
    batch = {"image": sequences(8, 2, 16)}

    def fixed_loss() -> dict[str, float]:
        torch.manual_seed(123)
        with torch.no_grad():
            return {k: float(v) for k, v in obj(batch).terms.items()}

    before = fixed_loss()
    opt = torch.optim.AdamW(obj.parameters(), lr=2e-3)
    for _ in range(20):
        out = obj(batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    after = fixed_loss()
    assert after["bm_mae"] < 0.5 * before["bm_mae"], (before, after)
    assert all(after[f"recon_c{i}"] < before[f"recon_c{i}"] for i in range(4)), (before, after)


def test_encoder_on_a_subset_of_sequences_and_synthesis() -> None:
    """FLAIR + T1 only (slots 3 and 0): the absent sequences never reach the encoder; zero-filled input
    (what the evaluators give fixed-channel encoders) runs too; a held-out sequence is synthesised."""
    torch.manual_seed(0)
    obj = tiny(3, 16, 8).eval()
    encoder = obj.encoder
    x = sequences(2, 3, 16)
    absent = torch.tensor([[False, True, True, False]] * 2)
    out = encoder(x, channel_padding_mask=absent)
    noise = x.clone()
    noise[:, 1:3] = torch.rand_like(noise[:, 1:3])
    torch.testing.assert_close(encoder(noise, channel_padding_mask=absent).pooled, out.pooled, atol=1e-5, rtol=1e-5)
    assert out.pooled.shape == (2, 48) and out.patch_tokens.shape == (2, 8, 48)
    zero_filled = encoder(x * (~absent)[:, :, None, None, None])
    assert torch.isfinite(zero_filled.pooled).all() and zero_filled.patch_tokens.shape == (2, 8, 48)
    available = torch.tensor([[True, True, True, False]] * 2)
    synth = obj.reconstruct({"image": x}, available)
    x2 = x.clone()
    x2[:, 3] = torch.rand_like(x2[:, 3])  # the held-out FLAIR is never read
    torch.testing.assert_close(obj.reconstruct({"image": x2}, available), synth)


def test_backbone_vit_objective_bm_mae_composes_a_per_modality_vit() -> None:
    """``backbone=vit objective=bm_mae`` alone builds the per-modality ViT; other objectives keep the
    fused ViT, and an explicit ``backbone.channel_tokens`` wins."""
    from ssl_med.config import parse_pretrain_config

    def backbone(*overrides: str) -> dict:
        with initialize_config_module(config_module="ssl_med.conf", version_base="1.3"):
            return parse_pretrain_config(compose(config_name="pretrain", overrides=["backbone=vit", *overrides])).backbone

    assert backbone("objective=bm_mae")["channel_tokens"] == "per_modality"
    assert backbone("objective=mae")["channel_tokens"] == "fused"
    assert backbone("objective=mae", "backbone.channel_tokens=per_modality")["channel_tokens"] == "per_modality"
    with pytest.raises(ValueError, match="per_modality"):
        OBJECTIVES.build("bm_mae", encoder=tiny(2, 16, 4).encoder, in_chans=4, channel_tokens="fused")
