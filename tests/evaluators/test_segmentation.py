"""UNETR decoder shapes, Dice against a hand computation, real-data loaders and training."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
import torch

from ssl_med.evaluators.base import EvalContext, layer_decay_groups
from ssl_med.evaluators.datasets import load_eval_data, split_by_location
from ssl_med.evaluators.metrics import dice_per_class
from ssl_med.evaluators.segmentation import score_items, train_segmenter
from ssl_med.evaluators.unetr import UnetrSegmenter, default_layers

from .conftest import seg_cfg, tiny_vit


def _hand_dice(pred: np.ndarray, truth: np.ndarray, cls: int) -> float:
    p, t = pred == cls, truth == cls
    return 2 * np.logical_and(p, t).sum() / (p.sum() + t.sum())


def test_dice_matches_hand_computation() -> None:
    truth = np.zeros((6, 6), dtype=np.int64)
    truth[1:4, 1:4] = 1  # 9 px
    truth[4:6, 4:6] = 2  # 4 px
    pred = np.zeros_like(truth)
    pred[2:5, 2:5] = 1  # 9 px, overlap 4 with class 1
    pred[5, 5] = 2  # 1 px, overlap 1 with class 2
    ours = dice_per_class(torch.from_numpy(pred)[None], torch.from_numpy(truth)[None], 3)
    np.testing.assert_allclose(ours, [2 * 4 / 18, 2 * 1 / 5])
    np.testing.assert_allclose(ours, [_hand_dice(pred, truth, 1), _hand_dice(pred, truth, 2)])


def test_score_items_stacks_same_shape_items_into_one_global_dice() -> None:
    rng = np.random.default_rng(0)
    truths = [rng.integers(0, 2, size=(8, 8)) for _ in range(3)]
    preds = [rng.integers(0, 2, size=(8, 8)) for _ in range(3)]
    items = [(np.zeros((1, 8, 8), np.float32), t) for t in truths]
    got = score_items(preds, items, 2)
    np.testing.assert_allclose(got, [_hand_dice(np.stack(preds), np.stack(truths), 1)])


@pytest.mark.parametrize(("dims", "patch", "size"), [(2, 4, 16), (2, 8, 32), (2, 16, 32), (3, 8, 16)])
def test_unetr_decoder_shapes(dims: int, patch: int, size: int) -> None:
    model = UnetrSegmenter(tiny_vit(dims, size, patch), num_classes=3, feature_size=4)
    x = torch.rand(2, 1, *([size] * dims))
    assert model(x).shape == (2, 3, *([size] * dims))
    hidden, bottleneck = model.encode(x)
    grid = [size // patch] * dims
    assert len(hidden) == len(model.layers) == int(np.log2(patch)) - 1
    assert all(h.shape == (2, 32, *grid) for h in hidden) and bottleneck.shape == (2, 32, *grid)


def test_unetr_frozen_trains_decoder_only_and_rejects_odd_patches() -> None:
    model = UnetrSegmenter(tiny_vit(2, 32, 8), num_classes=2, feature_size=4, frozen=True)
    model(torch.rand(1, 1, 32, 32)).sum().backward()
    assert all(p.grad is None for p in model.encoder.parameters())
    assert any(p.grad is not None for p in model.ups.parameters())
    assert default_layers(12, 4) == [2, 5, 8]
    with pytest.raises(ValueError, match="power-of-two"):
        UnetrSegmenter(tiny_vit(2, 30, 6), num_classes=2)


def test_layer_decay_groups_scale_learning_rates_by_depth() -> None:
    encoder = tiny_vit()
    groups = layer_decay_groups(encoder, lr=1.0, layer_decay=0.5)
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert lr_of[id(encoder.blocks[1].mlp.fc1.weight)] == 0.5
    assert lr_of[id(encoder.blocks[0].mlp.fc1.weight)] == 0.25
    assert lr_of[id(encoder.patch_embed.proj.weight)] == 0.125
    assert lr_of[id(encoder.norm.weight)] == 1.0
    assert sum(len(g["params"]) for g in groups) == len(list(encoder.parameters()))


def test_brats_3d_split_by_location(brats_cfg: dict[str, Any]) -> None:
    data = load_eval_data(brats_cfg)
    depths = {s: data.items[s][0][1].shape[0] for s in ("train", "val", "test")}
    assert data.num_classes == 4
    assert all(data.items[s][0][1].max() > 0 for s in depths)  # tumour in every slab
    shapes = {data.items[s][0][1].shape[1:] for s in depths}
    assert len(shapes) == 1  # same Y/X extent, disjoint Z slabs
    label = np.zeros((10, 2, 2), dtype=np.int64)
    label[2:8] = 1
    parts = split_by_location(np.zeros((1, 10, 2, 2)), label, 0, ["a", "b"], [0.5, 0.5])
    assert parts["a"][1].shape[0] == 5 and parts["b"][1].shape[0] == 5


@pytest.mark.parametrize("task", ["kvasir", "brats2d"])
def test_segmentation_loss_falls_on_real_data(task: str, kvasir_cfg: dict, brats_cfg: dict, tmp_path) -> None:
    if task == "kvasir":
        data_cfg = kvasir_cfg
    else:
        data_cfg = {
            **brats_cfg,
            "name": "brats2d",
            "spatial_dims": 2,
            "downsample": 2,
            "image_size": 32,
            "slice_stride": 2,
        }
    data = load_eval_data(data_cfg)
    assert data.spatial_dims == 2 and all(len(data.items[s]) for s in ("train", "val", "test"))
    model = UnetrSegmenter(tiny_vit(2, 32, 8), data.num_classes, feature_size=8, frozen=False)
    cfg = seg_cfg(steps=16, eval_every=16, lr=1e-2, encoder_lr_scale=0.1, mode="finetune")
    history = train_segmenter(model, data, cfg, EvalContext(tmp_path, "t", "k"))["history"]
    losses = [h["loss"] for h in history]
    assert np.mean(losses[-4:]) < np.mean(losses[:4])


@pytest.mark.parametrize("mode", ["frozen", "finetune"])
def test_finetune_moves_encoder_and_frozen_does_not(mode: str, tmp_path) -> None:
    from ssl_med.evaluators.datasets import SegmentationData

    rng = np.random.default_rng(0)
    items = [
        (rng.random((1, 32, 32), dtype=np.float32), (rng.random((32, 32)) > 0.7).astype(np.int64))
        for _ in range(3)
    ]
    data = SegmentationData("synthetic", 2, {"train": items, "val": items[:1], "test": items[:1]}, ["fg"])
    model = UnetrSegmenter(tiny_vit(), 2, feature_size=4, frozen=mode == "frozen")
    before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    train_segmenter(model, data, seg_cfg(mode=mode, steps=2, eval_every=100), EvalContext(tmp_path, "t", "k"))
    moved = any(not torch.equal(before[k], v) for k, v in model.encoder.state_dict().items())
    assert moved == (mode == "finetune")


def test_evaluation_volumes_are_scaled_as_ingest_recorded_them(tmp_path) -> None:
    """A skull-stripped MRI (zero background) is scaled by the window the store records for it, the one its
    pretraining crops were scaled by, not by the percentiles of its non-zero voxels."""
    from ssl_med.data.intensity import intensity_window, normalise_intensity
    from ssl_med.data.store import ImageStore
    from ssl_med.evaluators.datasets import percentile_scale

    rng = np.random.default_rng(0)
    volume = np.zeros((2, 24, 24, 24), dtype=np.float32)
    volume[:, 4:18, 5:19, 6:20] = rng.uniform([[[[120.0]]], [[[40.0]]]], [[[[520.0]]], [[[280.0]]]], (2, 14, 14, 14))
    store = ImageStore(str(tmp_path / "mr.zarr"), mode="w")
    store.add("case", volume, (1.0, 1.0, 1.0))
    meta = ImageStore(str(tmp_path / "mr.zarr")).manifest["case"]
    ours = percentile_scale(volume)
    np.testing.assert_allclose(ours, normalise_intensity(volume, intensity_window(meta)), atol=1e-6)
    brain = volume[0][volume[0] > 0]
    nonzero_window = (np.percentile(brain, 0.5), np.percentile(brain, 99.5))
    assert nonzero_window[0] > 100 and float(ours[0][volume[0] > 0].min()) > 0.15  # brain voxels keep their offset from 0
