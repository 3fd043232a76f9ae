"""Evaluation follows the encoder: MAE-family encoders are read by their mean patch token, and
MedMNIST-style files are resized to the encoder's input size unless a size is given."""

from __future__ import annotations

from pathlib import Path

from ssl_med.build import build_encoder
from ssl_med.evaluators.api import evaluate_checkpoint, match_encoder
from ssl_med.evaluators.datasets import eval_data_config


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


def test_checkpoint_is_evaluated_at_its_input_size(tmp_path: Path) -> None:
    """A 28 px, patch-7 encoder (not a multiple of the file's default 32 px) is evaluated at 28 px."""
    from ssl_med.export import save_encoder

    from .test_medmnist_group import cycle, write_npz

    backbone = {"name": "vit", "spatial_dims": 2, "in_chans": 1, "img_size": [28, 28], "patch_size": 7,
                "embed_dim": 32, "depth": 1, "num_heads": 2}
    save_encoder(build_encoder(backbone), tmp_path / "run" / "encoder", {"backbone": backbone, "objective": {"name": "dino"}})
    path = write_npz(tmp_path / "foo.npz", (28, 28), cycle(12, 2))
    data = eval_data_config("medmnist", [f"eval_data.path={path}", "eval_data.published=null"])
    probe = {"name": "linear_probe", "features": "auto", "C": [1.0], "select_metric": "auroc",
             "label_fractions": [], "batch_size": 8}
    results = evaluate_checkpoint(tmp_path / "run", probe, data, tmp_path / "out", baseline=False)
    assert results["config"]["eval_data"]["image_size"] == 28
    assert results["config"]["eval"]["features"] == "pooled"


def test_patch_token_features_keep_the_token_map() -> None:
    """``patch_tokens`` is every final patch token in raster order, concatenated: ``(N, P * D)``."""
    import torch

    from ssl_med.evaluators.features import extract_features

    backbone = {"name": "vit", "spatial_dims": 2, "in_chans": 1, "img_size": [28, 28], "patch_size": 7,
                "embed_dim": 32, "depth": 1, "num_heads": 2}
    encoder = build_encoder(backbone).eval()
    x = torch.rand(5, 1, 28, 28)
    feats = extract_features(encoder, x, "patch_tokens", batch_size=2)
    with torch.no_grad():
        tokens = encoder(x).patch_tokens
    assert feats.shape == (5, 16 * 32)
    assert torch.allclose(torch.from_numpy(feats).view(5, 16, 32), tokens, atol=1e-6)
    assert torch.allclose(torch.from_numpy(extract_features(encoder, x, "mean_patch")), tokens.mean(1), atol=1e-6)
