"""Evaluation follows the encoder: MAE-family encoders are read by their mean patch token, and
MedMNIST-style files are resized to the encoder's input size unless a size is given."""

from __future__ import annotations

from ssl_med.evaluators.api import match_encoder


def test_auto_features_follow_the_pretraining_objective() -> None:
    data = {"kind": "medmnist", "image_size": 64}
    for objective, expected in (("mae", "mean_patch"), ("hi_end_mae", "mean_patch"), ("dino", "pooled"), ("voco", "pooled")):
        cfg, _ = match_encoder({"features": "auto"}, data, {"objective": {"name": objective}})
        assert cfg["features"] == expected, objective
    cfg, _ = match_encoder({"features": "auto"}, data, {})
    assert cfg["features"] == "pooled", "an encoder without a recorded objective is read by its pooled output"
    cfg, _ = match_encoder({"features": "pooled"}, data, {"objective": {"name": "mae"}})
    assert cfg["features"] == "pooled", "an explicit choice is kept"


def test_null_image_size_is_the_encoders_input_size() -> None:
    backbone = {"name": "vit", "spatial_dims": 2, "img_size": [28, 28]}
    _, data = match_encoder({}, {"kind": "medmnist", "image_size": None}, {"backbone": backbone})
    assert data["image_size"] == 28
    _, data = match_encoder({}, {"kind": "medmnist", "image_size": 64}, {"backbone": backbone})
    assert data["image_size"] == 64, "an explicit size is kept"
    _, data = match_encoder({}, {"kind": "medmnist", "image_size": None}, {"backbone": {**backbone, "img_size": 32, "spatial_dims": 3}})
    assert data["image_size"] == 32
    _, data = match_encoder({}, {"kind": "brats", "image_size": None}, {"backbone": backbone})
    assert data["image_size"] is None, "segmentation sets keep their own geometry"
