"""ViT with one token per (channel, patch) (``channel_tokens="per_modality"``, BM-MAE's tokenisers): the
default ViT is unchanged, each modality has its own kernel, absent sequences are left out, the
per-token selection agrees with the padded sequence, and fused weights load into it."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from backbones.vit import VisionTransformer

TOL = {"atol": 2e-5, "rtol": 1e-4}


def make(spatial_dims: int = 2, channel_tokens: str = "per_modality", **kw: object) -> VisionTransformer:
    torch.manual_seed(0)
    kw = {"in_chans": 4, "img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2, **kw}
    return VisionTransformer(spatial_dims=spatial_dims, channel_tokens=channel_tokens, **kw).eval()


def test_default_vit_is_unchanged() -> None:
    """Same parameters and draws as a ViT built without the option; the per-modality arguments are refused."""
    fused = make(channel_tokens="fused")
    torch.manual_seed(0)
    plain = VisionTransformer(spatial_dims=2, in_chans=4, img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    assert fused.state_dict().keys() == plain.state_dict().keys() and "modality_embed" not in fused.state_dict()
    assert all(torch.equal(v, plain.state_dict()[k]) for k, v in fused.state_dict().items())
    assert fused.patch_embed.proj.weight.shape == (32, 4, 4, 4) and not fused.tokens_per_channel
    assert fused.no_weight_decay() == plain.no_weight_decay()
    with pytest.raises(ValueError, match="per_modality"):
        fused(torch.rand(1, 4, 16, 16), channel_padding_mask=torch.zeros(1, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="fused' or 'per_modality"):
        make(channel_tokens="grouped")


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_shapes_and_one_kernel_per_modality(spatial_dims: int) -> None:
    enc = make(spatial_dims)
    assert enc.patch_embed.proj.weight.shape == (4 * 32, 1, *(4,) * spatial_dims)
    assert enc.modality_embed.shape == (4, 32) and "modality_embed" in enc.no_weight_decay()
    x = torch.rand(2, 4, *(16,) * spatial_dims)
    out = enc(x, return_layers=(0,))
    n = 4**spatial_dims
    assert out.pooled.shape == (2, 32) and out.patch_tokens.shape == (2, n, 32) and out.hidden_states[0].shape == (2, n, 32)
    tokens, grid = enc.patch_embed(x)
    assert tokens.shape == (2, 4, n, 32) and grid == (4,) * spatial_dims
    x2 = x.clone()
    x2[:, 2] = torch.rand_like(x2[:, 2])
    changed = (enc.patch_embed(x2)[0] - tokens).abs().flatten(2).amax(dim=2) > 0  # (B, C): only channel 2
    assert changed[:, 2].all() and not changed[:, [0, 1, 3]].any()
    # a channel's tokens are its own single-channel convolution
    conv = torch.nn.functional.conv2d if spatial_dims == 2 else torch.nn.functional.conv3d
    w, b = enc.patch_embed.proj.weight[64:96], enc.patch_embed.proj.bias[64:96]
    own = conv(x[:, 2:3], w, b, stride=4).flatten(2).transpose(1, 2)
    torch.testing.assert_close(tokens[:, 2], own, **TOL)


def test_absent_sequences_are_left_out_and_agree_with_token_selection() -> None:
    enc = make()
    x = torch.rand(2, 4, 16, 16)
    absent = torch.tensor([[False, True, False, True], [False, True, False, True]])
    out = enc(x, channel_padding_mask=absent)
    garbage = x.clone()
    garbage[:, [1, 3]] = float("nan")  # never read
    torch.testing.assert_close(enc(garbage, channel_padding_mask=absent).pooled, out.pooled, **TOL)
    # the same two sequences' 32 tokens selected one by one: same CLS (attention is over the same set)
    n = 16
    keep = torch.cat([torch.arange(0, n), torch.arange(2 * n, 3 * n)]).expand(2, -1)
    tokens = enc(x, token_keep_idx=keep)
    torch.testing.assert_close(tokens.pooled, out.pooled, **TOL)
    assert tokens.patch_tokens.shape == (2, 2 * n, 32)
    # and the present channels' mean of those tokens is the padded forward's patch output
    torch.testing.assert_close(tokens.patch_tokens.reshape(2, 2, n, 32).mean(1), out.patch_tokens, **TOL)
    with pytest.raises(ValueError, match="missing channel"):
        enc(x, token_keep_idx=keep + n, channel_padding_mask=absent)
    with pytest.raises(ValueError, match="no channel left"):
        enc(x, channel_padding_mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="input slots"):
        enc(x, channel_names=[["t1", "t1ce", "t2", "flair"]] * 2)


@pytest.mark.parametrize("options", [{"class_token": False}, {"num_register_tokens": 2, "pos_embed": "sincos"}])
def test_prefix_variants_mask_and_keep_idx(options: dict) -> None:
    """Mean pooling without CLS, registers, iBOT's spatial mask and MAE's kept patches (all channels)."""
    enc = make(**options)
    x = torch.rand(2, 4, 16, 16)
    out = enc(x, mask=torch.rand(2, 16) > 0.5)
    assert out.pooled.shape == (2, 32) and out.patch_tokens.shape == (2, 16, 32)
    kept = enc(x, keep_idx=torch.tensor([[0, 5, 9], [1, 2, 3]]))
    assert kept.patch_tokens.shape == (2, 3, 32)
    if not options.get("class_token", True):
        torch.testing.assert_close(out.pooled, out.patch_tokens.mean(1), **TOL)
    else:
        assert out.prefix_tokens.shape == (2, 3, 32)


def test_init_from_fused_weights_gives_every_modality_the_kernel(tmp_path: Path) -> None:
    """A fused 3-channel checkpoint: its kernel summed to one channel for every modality (as ChAda-ViT's)."""
    source = make(channel_tokens="fused", in_chans=3)
    path = tmp_path / "vit.pth"
    torch.save(source.state_dict(), path)
    enc = make(init_from=str(path))
    summed = source.patch_embed.proj.weight.sum(1, keepdim=True)
    torch.testing.assert_close(enc.patch_embed.proj.weight, summed.repeat(4, 1, 1, 1))
    torch.testing.assert_close(enc.patch_embed.proj.bias, source.patch_embed.proj.bias.repeat(4))
    torch.testing.assert_close(enc.blocks[1].mlp.fc2.weight, source.blocks[1].mlp.fc2.weight)
    # its own checkpoint loads as it is
    torch.save(enc.state_dict(), path)
    again = make(init_from=str(path))
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in enc.state_dict().items())


def test_rebuilt_from_its_config_and_weights() -> None:
    """What an export holds (the constructor config and the state dict) rebuilds the same encoder; a
    fused ViT refuses per-modality weights."""
    from ssl_med.build import build_encoder

    config = {"name": "vit", "spatial_dims": 3, "in_chans": 4, "img_size": 16, "patch_size": 8, "embed_dim": 32,
              "depth": 1, "num_heads": 2, "channel_tokens": "per_modality"}  # fmt: skip
    enc = build_encoder(config).eval()
    again = build_encoder(config, weights=enc.state_dict()).eval()
    x = torch.rand(1, 4, 16, 16, 16)
    torch.testing.assert_close(again(x).pooled, enc(x).pooled)
    with pytest.raises(Exception, match=r"modality_embed|shape"):
        build_encoder({**config, "channel_tokens": "fused"}, weights=enc.state_dict())
