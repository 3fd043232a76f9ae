"""Start-up view geometry: misfits fail before any work with the fixing override, default crops adapt,
the backbone is built for the views it sees, and the headline command trains as typed."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from ssl_med.config import PretrainConfig
from ssl_med.geometry import GeometryError
from ssl_med.train.geometry import prepare_pretrain_config

#: the product's headline command (README), as typed on a fresh install, one step long
HEADLINE = ("pretrain", "backbone=mamba", "objective=voco", "trainer.max_steps=1")

MISFITS = {
    "voco-on-2d-demo": ["objective=voco", "data=demo"],
    "voco-on-3d-cubes": ["objective=voco", "data=demo3d"],
    "voco-2d-crop-on-3d-data": ["objective=voco", "data.crop_size=[96,96]"],
    "mae-crop-off-patch": ["objective=mae", "data.crop_size=[60,60]"],
    "dino-global-off-patch": ["objective=dino", "objective.views.global_crop_size=[60,60]"],
    "graph-matching-batch-1": ["objective=graph_matching", "data.batch_size=1"],
}


def prepare(*overrides: str) -> PretrainConfig:
    with initialize_config_module(config_module="ssl_med.conf", version_base="1.3"):
        raw = compose(config_name="pretrain", overrides=list(overrides))
    return prepare_pretrain_config(raw, overrides)


@pytest.mark.parametrize("overrides", MISFITS.values(), ids=MISFITS.keys())
def test_misfit_names_overrides_that_fix_it(overrides: list[str]) -> None:
    with pytest.raises(GeometryError, match="fix: ") as info:
        prepare(*overrides)
    assert info.value.fixes
    for fix in info.value.fixes:
        prepare(*overrides, fix)


def test_default_crop_adapts_to_the_objective(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="ssl_med.train.geometry"):
        cfg = prepare("objective=mae", "data.patch_size=12")
    assert cfg.data.crop_size == [72, 72] and cfg.backbone["img_size"] == [72, 72]
    assert "data.crop_size 64x64 -> 72x72" in caplog.text
    cfg = prepare("objective=voco", "objective.grid=[5,5]")
    assert cfg.data.crop_size == [32, 120, 120] and cfg.backbone["img_size"] == [32, 24, 24]


def test_backbone_follows_the_views_unless_set() -> None:
    assert prepare("objective=dino", "objective.views.global_crop_size=[48,48]").backbone["img_size"] == [48, 48]
    cfg = prepare("objective=voco", "backbone.img_size=[32,96,96]")
    assert cfg.data.name == "demo3d_voco" and cfg.backbone["img_size"] == [32, 96, 96]


def test_cli_misfit_fails_before_any_work(run_cli, tmp_path: Path) -> None:
    result = run_cli("pretrain", "objective=voco", "data=demo", f"hydra.run.dir={tmp_path}")
    assert result.returncode != 0
    assert (
        "objective=voco does not fit data=demo" in result.stderr and "data.crop_size=[72,72]" in result.stderr
    )
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.parametrize(
    "extra",
    [
        pytest.param(
            (), marks=pytest.mark.slow, id="as-typed"
        ),  # ~2.5 min on 2 busy CPU cores (24 Mamba blocks)
        pytest.param(("backbone.depth=2", "data.num_workers=0"), id="shallow"),
    ],
)
def test_headline_command_trains(run_cli, tmp_path: Path, extra: tuple[str, ...]) -> None:
    result = run_cli(
        *HEADLINE, *extra, f"hydra.run.dir={tmp_path}", "trainer.progress_bar=false", timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "encoder" / "model.safetensors").is_file()
    exported = json.loads((tmp_path / "encoder" / "config.json").read_text())
    assert exported["data"]["name"] == "demo3d_voco"
    assert exported["encoder"]["img_size"] == [32, 32, 32]  # built for VoCo's base crops, not the region
