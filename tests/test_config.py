from __future__ import annotations

import pytest
from hydra import compose, initialize_config_module

from ssl_med.config import ConfigError, DataConfig, parse_pretrain_config


def compose_pretrain(*overrides: str):
    with initialize_config_module(config_module="ssl_med.conf", version_base="1.3"):
        return compose(config_name="pretrain", overrides=list(overrides))


def test_default_config_parses() -> None:
    cfg = parse_pretrain_config(compose_pretrain())
    assert isinstance(cfg.data, DataConfig)
    assert cfg.backbone["name"] == "vit" and cfg.objective["name"] == "mae"
    # interpolations resolve the backbone geometry from the data group
    assert cfg.backbone["spatial_dims"] == 2 and cfg.backbone["img_size"] == [64, 64]
    assert cfg.experiment == "vit-mae-demo"


def test_3d_demo_config() -> None:
    cfg = parse_pretrain_config(compose_pretrain("data=demo3d"))
    assert cfg.data.spatial_dims == 3 and cfg.backbone["spatial_dims"] == 3
    assert cfg.data.crop_size == [32, 32, 32]


def test_unknown_key_in_group_is_reported() -> None:
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['batchsize'\] in 'data'.*batch_size"):
        parse_pretrain_config(compose_pretrain("+data.batchsize=4"))


def test_wrong_type_is_reported() -> None:
    with pytest.raises(ConfigError, match="max_steps"):
        parse_pretrain_config(compose_pretrain("trainer.max_steps=many"))


def test_unknown_group_option_lists_choices() -> None:
    from hydra.errors import MissingConfigException

    with pytest.raises(MissingConfigException, match="vit"):
        compose_pretrain("backbone=vitt")


@pytest.mark.parametrize("name", ["adamw", "lamb", "lars", "sgd"])
def test_every_optimiser_config_parses(name: str) -> None:
    cfg = parse_pretrain_config(compose_pretrain(f"optim={name}"))
    assert cfg.optim.name == name


def test_online_ridge_takes_a_grid_or_one_strength() -> None:
    assert parse_pretrain_config(compose_pretrain()).online_eval.ridge == [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0]
    assert parse_pretrain_config(compose_pretrain("online_eval.ridge=0.5")).online_eval.ridge == [0.5]
    assert parse_pretrain_config(compose_pretrain("online_eval.ridge=[0.1,1]")).online_eval.ridge == [0.1, 1.0]
