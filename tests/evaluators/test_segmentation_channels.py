"""Segmentation on subsets of the BraTS sequences (eval.channels / eval.channel_subsets, issue #19):
absent sequences zero-filled for fixed-channel encoders, omitted for channel-adaptive ones and left out
of the sequence (masked) for the per-modality ViT; an encoder built for the 4 sequences evaluates on any
subset."""

from __future__ import annotations

from itertools import combinations
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ssl_med.evaluators.base import EvalContext
from ssl_med.evaluators.channels import ChannelBoundEncoder, ChannelMaskedEncoder, select_channels
from ssl_med.evaluators.datasets import load_eval_data
from ssl_med.evaluators.segmentation import segmentation
from ssl_med.evaluators.unetr import UnetrSegmenter
from ssl_med.registry import BACKBONES

from .conftest import seg_cfg

SEQUENCES = ["t1", "t1ce", "t2", "flair"]


@pytest.fixture(scope="module")
def brats4(brats_cfg: dict[str, Any]) -> dict[str, Any]:
    return {**brats_cfg, "modalities": SEQUENCES}


def chada() -> Any:
    torch.manual_seed(0)
    return BACKBONES.build(
        "chada_vit", spatial_dims=3, img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2,
        channel_vocab=SEQUENCES,
    ).eval()


def vit(in_chans: int, channel_tokens: str = "fused") -> Any:
    torch.manual_seed(0)
    return BACKBONES.build(
        "vit", spatial_dims=3, in_chans=in_chans, img_size=16, patch_size=8, embed_dim=32, depth=2, num_heads=2,
        channel_tokens=channel_tokens,
    ).eval()


def test_fixed_channel_encoders_see_absent_sequences_as_zeros(brats4: dict[str, Any]) -> None:
    data = load_eval_data(brats4, 4)
    assert data.channel_names == SEQUENCES
    fused = vit(4)
    sub, encoder = select_channels(data, fused, ["FLAIR", "t1ce"])
    assert encoder is fused and encoder.in_chans == 4  # not masked: it fuses the channels per patch
    for (full, _), (img, _) in zip(data.items["train"], sub.items["train"], strict=True):
        assert img.shape == full.shape
        np.testing.assert_array_equal(img[[1, 3]], full[[1, 3]])
        assert not img[[0, 2]].any() and full[[0, 2]].any()
    with pytest.raises(ValueError, match="not a channel"):
        select_channels(data, vit(4), ["dwi"])
    averaged = load_eval_data(brats4, 1)
    assert averaged.channel_names is None
    with pytest.raises(ValueError, match="one input per sequence"):
        select_channels(averaged, vit(1), ["flair"])


def test_per_modality_vit_leaves_absent_sequences_out(brats4: dict[str, Any]) -> None:
    """The per-modality ViT is handed the subset's channel_padding_mask: the absent sequences' content
    (here NaN) is never read, and the output is the masked forward's (not the zero-filled one's)."""
    data = load_eval_data(brats4, 4)
    raw = vit(4, "per_modality")
    sub, encoder = select_channels(data, raw, ["FLAIR", "t1ce"])
    assert isinstance(encoder, ChannelMaskedEncoder) and encoder.encoder is raw and encoder.in_chans == 4
    img = sub.items["train"][0][0]
    assert not img[[0, 2]].any()  # still zero-filled for the decoder's convolutional stem
    x = torch.from_numpy(img[None, :, :16, :16, :16]).clone()
    poisoned = x.clone()
    poisoned[:, [0, 2]] = float("nan")
    out = encoder(poisoned, return_layers=(0,))
    assert torch.isfinite(out.pooled).all() and torch.isfinite(out.patch_tokens).all()
    absent = torch.tensor([[True, False, True, False]])
    masked = raw(x, channel_padding_mask=absent, return_layers=(0,))
    torch.testing.assert_close(out.pooled, masked.pooled)
    torch.testing.assert_close(out.patch_tokens, masked.patch_tokens)
    torch.testing.assert_close(out.hidden_states[0], masked.hidden_states[0])
    zero_filled = raw(x)
    assert not torch.allclose(zero_filled.pooled, masked.pooled)
    # parameters and metadata read through under encoder.
    assert set(encoder.state_dict()) == {f"encoder.{k}" for k in raw.state_dict()}
    assert "encoder.modality_embed" in encoder.no_weight_decay()
    assert encoder.layer_id("encoder.blocks.1.attn.qkv.weight") == raw.layer_id("blocks.1.attn.qkv.weight")
    model = UnetrSegmenter(encoder, num_classes=4, feature_size=4)
    assert model(x).shape == (1, 4, 16, 16, 16)
    same, unwrapped = select_channels(data, raw, None)
    assert unwrapped is raw and same is data


def test_channel_adaptive_encoders_omit_absent_sequences(brats4: dict[str, Any]) -> None:
    averaged = load_eval_data(brats4, 1)  # what evaluation loads for an encoder without a channel count
    sub, encoder = select_channels(averaged, chada(), ["flair", "t1"])
    assert isinstance(encoder, ChannelBoundEncoder) and encoder.names == ["flair", "t1"] and encoder.in_chans == 2
    full = load_eval_data(brats4, None)
    for (img4, _), (img2, _) in zip(full.items["test"], sub.items["test"], strict=True):
        np.testing.assert_array_equal(img2, img4[[3, 0]])
    x = torch.from_numpy(sub.items["train"][0][0][None, :, :16, :16, :16])
    bound = encoder(x, return_layers=(0,))
    direct = encoder.encoder(x, channel_names=[["flair", "t1"]], return_layers=(0,))
    torch.testing.assert_close(bound.pooled, direct.pooled)
    model = UnetrSegmenter(encoder, num_classes=4, feature_size=4)
    assert model(x).shape == (1, 4, 16, 16, 16)


def test_every_subset_of_the_four_sequences_encodes(brats4: dict[str, Any]) -> None:
    full = load_eval_data(brats4, None)
    enc = chada()
    x = torch.from_numpy(full.items["train"][0][0][None, :, :16, :16, :16])
    for k in range(1, 5):
        for subset in combinations(SEQUENCES, k):
            sub, bound = select_channels(full, enc, list(subset))
            out = bound(torch.from_numpy(sub.items["train"][0][0][None, :, :16, :16, :16]))
            assert out.pooled.shape == (1, 32) and torch.isfinite(out.pooled).all()
    assert x.shape[1] == 4


def test_subset_table(brats4: dict[str, Any], tmp_path: Path) -> None:
    data = load_eval_data(brats4, 1)
    cfg = seg_cfg(roi_size=[16, 16, 16], steps=2, eval_every=2, channel_subsets=[SEQUENCES, ["flair"], ["t1ce", "flair"]])
    ctx = EvalContext(tmp_path, "pretrained", "k", "cpu", None, 0)
    result = segmentation(chada(), cfg, data, ctx)
    rows = result.details["subsets"]
    assert [r["channels"] for r in rows] == [SEQUENCES, ["flair"], ["t1ce", "flair"]]
    for label in ("t1+t1ce+t2+flair", "flair", "t1ce+flair"):
        assert 0.0 <= result.metrics[f"{label}/dice_mean"] <= 1.0
        assert f"{label}/dice/ET" in result.metrics
    assert result.metrics["dice_mean"] == result.metrics["t1+t1ce+t2+flair/dice_mean"]
    fixed = segmentation(vit(4), seg_cfg(roi_size=[16, 16, 16], steps=2, eval_every=2, channels=["flair"]),
                         load_eval_data(brats4, 4), ctx)
    assert 0.0 <= fixed.metrics["dice_mean"] <= 1.0
    per_modality = segmentation(
        vit(4, "per_modality"),
        seg_cfg(roi_size=[16, 16, 16], steps=2, eval_every=2, mode="finetune", channel_subsets=[["flair"], ["t1", "t2"]],
                interpolation={"alphas": []}),
        load_eval_data(brats4, 4), ctx,
    )
    assert 0.0 <= per_modality.metrics["flair/dice_mean"] <= 1.0
    assert 0.0 <= per_modality.metrics["t1+t2/dice_mean"] <= 1.0
