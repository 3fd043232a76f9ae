"""Tiny encoders and small real-data configs shared by the evaluator tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from backbones.vit import VisionTransformer


def tiny_vit(
    spatial_dims: int = 2, img_size: int = 32, patch_size: int = 8, seed: int = 0
) -> VisionTransformer:
    """A 2-block, 32-wide ViT (random weights from ``seed``)."""
    torch.manual_seed(seed)
    return VisionTransformer(
        spatial_dims=spatial_dims,
        in_chans=1,
        img_size=img_size,
        patch_size=patch_size,
        embed_dim=32,
        depth=2,
        num_heads=2,
    ).eval()


@pytest.fixture(scope="session")
def breast_cfg(shared_data: Path) -> dict[str, Any]:
    """BreastMNIST, at most 60 items per split (stratified), upsampled to 32 px."""
    return {
        "name": "breastmnist",
        "kind": "medmnist",
        "path": str(shared_data / "medmnist" / "breastmnist.npz"),
        "task": "binary",
        "spatial_dims": 2,
        "image_size": 32,
        "subset": 60,
    }


@pytest.fixture(scope="session")
def kvasir_cfg(shared_data: Path) -> dict[str, Any]:
    return {
        "name": "kvasir",
        "kind": "kvasir",
        "path": str(shared_data / "kvasir_seg_sample"),
        "class_names": ["polyp"],
        "spatial_dims": 2,
        "image_size": 32,
        "roi_size": [32, 32],
        "split_counts": [3, 1, 1],
    }


@pytest.fixture(scope="session")
def brats_cfg(shared_data: Path) -> dict[str, Any]:
    """The BraTS case at 4 mm (downsample 4) with 16^3 crops."""
    return {
        "name": "brats",
        "kind": "brats",
        "path": str(shared_data / "brats2020_sample" / "BraTS20_Training_001"),
        "modalities": ["flair"],
        "label_map": {1: 1, 2: 2, 4: 3},
        "class_names": ["NCR", "ED", "ET"],
        "spatial_dims": 3,
        "downsample": 4,
        "split_axis": 0,
        "split_order": ["test", "val", "train"],
        "split_fractions": [0.3, 0.2, 0.5],
        "roi_size": [16, 16, 16],
        "image_size": None,
    }


def seg_cfg(**overrides: Any) -> dict[str, Any]:
    """A small ``eval=segmentation`` config."""
    cfg = {
        "name": "segmentation",
        "mode": "frozen",
        "feature_size": 8,
        "layers": None,
        "roi_size": [32, 32],
        "steps": 4,
        "batch_size": 2,
        "pos_fraction": 0.7,
        "lr": 3e-3,
        "encoder_lr_scale": 0.1,
        "layer_decay": 0.75,
        "weight_decay": 1e-5,
        "eval_every": 2,
        "sw_batch_size": 4,
        "sw_overlap": 0.25,
        "overlays": 1,
        "interpolation": {"alphas": [0.0, 1.0], "probe_data": None},
    }
    cfg.update(overrides)
    return cfg
