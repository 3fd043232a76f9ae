"""An objective and a few real batches from one ``ssl_med pretrain`` command line, without a trainer.

Benchmarks of one training step (precision, compilation) need exactly what ``ssl_med pretrain`` would
build — the composed config with its geometry fitted, the objective around its encoder, crops from the
configured store through the objective's views — but no Lightning loop around it::

    cfg, objective, batches = objective_and_batches(["objective=dino", "data.batch_size=8"], n_batches=4)
    loss = objective(batches[0]).loss
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from hydra import compose, initialize_config_module
from torch.utils.data import DataLoader

from ssl_med.data.crops import RandomCropDataset
from ssl_med.data.datamodule import resolve_store
from ssl_med.objective import Objective
from ssl_med.train.geometry import prepare_pretrain_config
from ssl_med.train.run import build_encoder, build_objective


def objective_and_batches(
    overrides: Sequence[str], n_batches: int, seed: int = 0
) -> tuple[Any, Objective, list[dict]]:
    """``(cfg, objective, batches)`` for ``ssl_med pretrain <overrides>``: the composed and geometry-fitted
    config, the objective built with weights seeded by ``seed``, and ``n_batches`` batches of
    ``data.batch_size`` random crops of the configured store (through the objective's view transform)."""
    overrides = list(overrides)
    with initialize_config_module(config_module="ssl_med.conf", version_base="1.3"):
        cfg = prepare_pretrain_config(compose(config_name="pretrain", overrides=overrides), overrides)
    torch.manual_seed(seed)
    objective = build_objective(cfg.objective, build_encoder(cfg.backbone))
    batch = int(cfg.data.batch_size)
    crops = RandomCropDataset(
        resolve_store(cfg.data), cfg.data.crop_size, cfg.data.num_channels, length=batch * n_batches,
        transform=objective.view_transform(),
    )  # fmt: skip
    return cfg, objective, list(DataLoader(crops, batch_size=batch))
