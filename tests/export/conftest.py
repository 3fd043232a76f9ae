"""Fixtures for the export tests: one real (tiny) pretraining run shared by the module's tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_module

from ssl_med.config import parse_pretrain_config

TINY_RUN = [
    "backbone.embed_dim=48",
    "backbone.depth=2",
    "backbone.num_heads=2",
    "objective.decoder_dim=32",
    "objective.decoder_depth=1",
    "objective.decoder_heads=2",
    "data.crop_size=[16,16]",
    "data.patch_size=4",
    "data.batch_size=4",
    "data.num_workers=0",
    "data.samples_per_epoch=16",
    "trainer.progress_bar=false",
    "trainer.max_steps=3",
    "trainer.log_every_n_steps=1",
    "trainer.preview_every_n_steps=0",
    "optim.warmup_steps=1",
]


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished 2D ViT + MAE pretraining run (3 steps): checkpoints/last.ckpt, encoder/, resolved_config.yaml."""
    from ssl_med.train.run import pretrain

    with initialize_config_module(config_module="ssl_med.conf", version_base="1.3"):
        cfg = parse_pretrain_config(compose(config_name="pretrain", overrides=TINY_RUN))
    run = tmp_path_factory.mktemp("run")
    pretrain(cfg, run)
    return run
