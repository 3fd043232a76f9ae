"""The small-scale recipes compose with every backbone x objective pair and build in 2D and 3D."""

from __future__ import annotations

import pytest
from hydra import compose, initialize_config_module

from ssl_med.registry import BACKBONES, OBJECTIVES
from ssl_med.train.geometry import prepare_pretrain_config
from ssl_med.train.run import build_encoder, build_objective

TINY = ["backbone.embed_dim=48", "backbone.depth=1"]


@pytest.mark.parametrize("recipe", ["small_2d", "small_3d"])
@pytest.mark.parametrize("objective", sorted(OBJECTIVES.names()))
@pytest.mark.parametrize("backbone", sorted(BACKBONES.names()))
def test_recipe_composes_with_every_pair(recipe: str, objective: str, backbone: str) -> None:
    overrides = [f"recipe={recipe}", f"backbone={backbone}", f"objective={objective}", *TINY]
    with initialize_config_module(config_module="ssl_med.conf", version_base="1.3"):
        cfg = prepare_pretrain_config(compose(config_name="pretrain", overrides=overrides), overrides)
    dims = 2 if recipe == "small_2d" else 3
    assert cfg.data.spatial_dims == dims and cfg.backbone["spatial_dims"] == dims
    assert cfg.data.min_foreground == 0.0 and cfg.data.split == "auto"
    assert 0 < cfg.optim.warmup_steps < 1, "warm-up as a fraction of the run"
    assert cfg.online_eval.every_n_steps > 0
    encoder = build_encoder(cfg.backbone)
    build_objective(cfg.objective, encoder)
