"""Every registered backbone pairs with every registered objective, in 2D and 3D, through the configs.

``backbone=B objective=O`` alone composes a config that passes the start-up geometry check (each
objective's default data, the backbone built for the views it sees); the other dimensionality is
chosen with ``data=``. One optimiser step per pair on real demo crops, at tiny width and depth (the
geometry stays the composed one): the loss is finite and the encoder gets gradients.
(Each objective's own tests check that it learns; this checks the wiring of the whole matrix.)
"""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_module
from torch.utils.data import DataLoader

from ssl_med.config import PretrainConfig
from ssl_med.data.crops import RandomCropDataset
from ssl_med.data.datamodule import resolve_store
from ssl_med.registry import BACKBONES, OBJECTIVES
from ssl_med.train.geometry import prepare_pretrain_config, view_geometry
from ssl_med.train.run import build_encoder, build_objective

#: ``data=`` overrides for the dimensionality that is not the objective's default (VoCo defaults to 3D)
OTHER_DATA = {"voco": ["data=demo", "data.crop_size=[96,96]"]}
TINY_BACKBONE = {"embed_dim": 48, "depth": 2}
PAIRS = [(b, o, d) for b in BACKBONES.names() for o in OBJECTIVES.names() for d in ("default", "other")]


def compose_pretrain(*overrides: str) -> PretrainConfig:
    """``ssl_med pretrain *overrides``'s config as the command prepares it (parsed, geometry fitted)."""
    with initialize_config_module(config_module="ssl_med.conf", version_base="1.3"):
        raw = compose(config_name="pretrain", overrides=list(overrides))
    return prepare_pretrain_config(raw, overrides)


@pytest.mark.parametrize(("backbone", "objective", "data"), PAIRS)
def test_pair_trains_one_step(backbone: str, objective: str, data: str) -> None:
    data_overrides = [] if data == "default" else OTHER_DATA.get(objective, ["data=demo3d"])
    cfg = compose_pretrain(f"backbone={backbone}", f"objective={objective}", *data_overrides)
    geometry = view_geometry(cfg)
    assert cfg.backbone["img_size"] == list(geometry.encoder_size)
    if data == "default":
        assert cfg.data.spatial_dims == (3 if objective == "voco" else 2)
    torch.manual_seed(0)
    encoder = build_encoder({**cfg.backbone, **TINY_BACKBONE})
    obj = build_objective(cfg.objective, encoder)
    store = resolve_store(cfg.data)
    ds = RandomCropDataset(store, cfg.data.crop_size, cfg.data.num_channels, length=2, transform=obj.view_transform())
    batch = next(iter(DataLoader(ds, batch_size=2)))
    out = obj(batch)
    assert torch.isfinite(out.loss), out.terms
    out.loss.backward()
    grads = [p.grad for p in encoder.parameters() if p.requires_grad and p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)
    obj.on_train_step_end(1, 10)
