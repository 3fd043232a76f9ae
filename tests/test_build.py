"""build_encoder: one builder for training, export, evaluation and the hub."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from ssl_med.build import build_encoder
from ssl_med.export import save_encoder
from ssl_med.weights import IntegrityError

VIT = {"name": "vit", "spatial_dims": 2, "in_chans": 1, "img_size": 16, "patch_size": 4, "embed_dim": 48, "depth": 2}


def test_weights_from_a_state_dict_or_an_export_folder(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = build_encoder(VIT)
    save_encoder(source, tmp_path, {"backbone": VIT}, model_card=False)
    for weights in (source.state_dict(), tmp_path, tmp_path / "model.safetensors"):
        torch.manual_seed(1)
        built = build_encoder(VIT, weights=weights)
        assert all(torch.equal(a, b) for a, b in zip(built.state_dict().values(), source.state_dict().values()))


def test_given_weights_replace_init_from_and_must_fit(tmp_path: Path) -> None:
    config = {**VIT, "init_from": str(tmp_path / "absent.safetensors")}
    with pytest.raises((FileNotFoundError, ValueError, OSError)):
        build_encoder(config)  # no weights: the backbone reads its starting point
    state = build_encoder(VIT).state_dict()
    build_encoder(config, weights=state)  # weights given: the starting point is never read
    with pytest.raises(IntegrityError, match="my checkpoint"):
        build_encoder({**VIT, "depth": 1}, weights=state, origin="my checkpoint")
