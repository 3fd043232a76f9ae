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
    problem = OBJECTIVES.get(objective).pairing_problem(backbone)
    if problem:
        pytest.skip(problem)
    overrides = [f"recipe={recipe}", f"backbone={backbone}", f"objective={objective}", *TINY]
    with initialize_config_module(config_module="ssl_med.conf", version_base="1.3"):
        cfg = prepare_pretrain_config(compose(config_name="pretrain", overrides=overrides), overrides)
    dims = 2 if recipe == "small_2d" else 3
    assert cfg.data.spatial_dims == dims and cfg.backbone["spatial_dims"] == dims
    assert cfg.data.min_foreground == 0.0 and cfg.data.split == "auto"
    assert cfg.data.small_images == "resize" and cfg.data.large_images == "crop"
    assert 0 < cfg.optim.warmup_steps < 1, "warm-up as a fraction of the run"
    assert cfg.online_eval.every_n_steps > 0
    encoder = build_encoder(cfg.backbone)
    build_objective(cfg.objective, encoder)


@pytest.mark.parametrize(
    ("overrides", "patch", "solarize", "student"),
    [
        (["recipe=small_2d", "objective=dino"], 7, 0.2, True),  # conf/recipe_objective/small_2d_dino.yaml
        (["recipe=small_2d", "objective=dino", "data.patch_size=4"], 4, 0.2, True),  # the command line wins
        (["recipe=small_3d", "objective=dino"], 8, 0.0, True),  # conf/recipe_objective/small_3d_dino.yaml
        (["recipe=small_3d", "objective=dino", "objective.views.solarize_prob=0.1", "online_eval.student=false"], 8, 0.1, False),
        (["objective=dino"], 8, 0.2, False),  # no recipe: the objective's own defaults
    ],
)
def test_recipe_settings_per_objective(overrides: list[str], patch: int, solarize: float, student: bool) -> None:
    """A recipe's per-objective file (recipe_objective/<recipe>_<objective>) applies on its own and
    loses to the command line."""
    with initialize_config_module(config_module="ssl_med.conf", version_base="1.3"):
        cfg = prepare_pretrain_config(compose(config_name="pretrain", overrides=overrides), overrides)
    assert cfg.data.patch_size == patch
    assert cfg.objective["views"]["solarize_prob"] == solarize
    assert cfg.online_eval.student is student


@pytest.mark.parametrize(
    ("recipe", "region", "base"),
    [("small_2d", [56, 56], [28, 28]), ("small_3d", [32, 64, 64], [32, 32, 32])],
)
def test_small_voco_fits_a_store(recipe: str, region: list[int], base: list[int]) -> None:
    """recipe_objective/<recipe>_voco: a store's data config gets a region VoCo's 2x2 grid divides into
    bases of the encoder's own input size (without it, the recipe's crop fails at start-up)."""
    overrides = [f"recipe={recipe}", "objective=voco", "data=store", "data.store=x.zarr"]
    with initialize_config_module(config_module="ssl_med.conf", version_base="1.3"):
        cfg = prepare_pretrain_config(compose(config_name="pretrain", overrides=overrides), overrides)
    assert list(cfg.data.crop_size) == region and list(cfg.objective["grid"]) == [2, 2]
    assert list(cfg.backbone["img_size"]) == base


def test_recipe_without_objective_file_composes() -> None:
    overrides = ["recipe=small_3d", "objective=bm_mae"]
    with initialize_config_module(config_module="ssl_med.conf", version_base="1.3"):
        cfg = compose(config_name="pretrain", overrides=overrides)
    assert cfg.data.patch_size == 8 and "views" not in cfg.objective


@pytest.mark.parametrize(
    ("overrides", "norm_pix_loss"),
    [
        (["recipe=small_3d", "objective=mae"], False),  # conf/recipe_objective/small_3d_mae.yaml: raw voxels
        (["recipe=small_3d", "objective=mae", "objective.norm_pix_loss=true"], True),  # the command line wins
        (["recipe=small_2d", "objective=mae"], True),
        (["objective=mae"], True),  # MAE's own default
    ],
)
def test_small_3d_mae_reconstructs_raw_voxels(overrides: list[str], norm_pix_loss: bool) -> None:
    with initialize_config_module(config_module="ssl_med.conf", version_base="1.3"):
        cfg = prepare_pretrain_config(compose(config_name="pretrain", overrides=overrides), overrides)
    assert cfg.objective["norm_pix_loss"] is norm_pix_loss


@pytest.mark.parametrize(
    ("overrides", "lr"),
    [
        (["recipe=small_3d", "objective=voco"], 1.0e-4),  # conf/recipe_objective/small_3d_voco.yaml
        (["recipe=small_3d", "objective=voco", "optim.lr=1e-3"], 1.0e-3),  # the command line wins
        (["recipe=small_3d", "objective=graph_matching"], 3.0e-4),  # conf/recipe_objective/small_3d_graph_matching.yaml
        (["recipe=small_2d", "objective=graph_matching"], 1.0e-3),
        (["recipe=small_3d", "objective=mae"], 1.5e-3),  # the recipe's own rate
        (["recipe=small_2d", "objective=voco"], 1.0e-3),
    ],
)
def test_small_3d_voco_and_graph_matching_train_at_their_own_learning_rate(overrides: list[str], lr: float) -> None:
    with initialize_config_module(config_module="ssl_med.conf", version_base="1.3"):
        cfg = prepare_pretrain_config(compose(config_name="pretrain", overrides=overrides), overrides)
    assert cfg.optim.lr == pytest.approx(lr)
