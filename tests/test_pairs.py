"""Every registered backbone pairs with every registered objective, in 2D and 3D, through the configs.

One optimiser step per pair on real demo crops: the loss is finite and the encoder gets gradients.
(Each objective's own tests check that it learns; this checks the wiring of the whole matrix.)
"""

from __future__ import annotations

import pytest
import torch
from hydra import compose, initialize_config_module
from torch.utils.data import DataLoader

from ssl_med.config import parse_pretrain_config
from ssl_med.data.crops import RandomCropDataset
from ssl_med.data.datamodule import resolve_store
from ssl_med.registry import BACKBONES, OBJECTIVES
from ssl_med.train.run import build_encoder, build_objective

#: data that an objective needs beyond the default demo crops (VoCo: regions divisible by its base grid)
OBJECTIVE_DATA = {("voco", 2): ["data.crop_size=[96,96]"], ("voco", 3): ["data=demo3d_voco"]}
PAIRS = [(b, o, d) for b in BACKBONES.names() for o in OBJECTIVES.names() for d in (2, 3)]


@pytest.mark.parametrize(("backbone", "objective", "spatial_dims"), PAIRS)
def test_pair_trains_one_step(backbone: str, objective: str, spatial_dims: int) -> None:
    data = "demo" if spatial_dims == 2 else "demo3d"
    overrides = [f"backbone={backbone}", f"objective={objective}", f"data={data}", "backbone.embed_dim=48", "backbone.depth=2"]
    overrides += OBJECTIVE_DATA.get((objective, spatial_dims), [])
    with initialize_config_module(config_module="ssl_med.conf", version_base="1.3"):
        cfg = parse_pretrain_config(compose(config_name="pretrain", overrides=overrides))
    torch.manual_seed(0)
    encoder = build_encoder(cfg.backbone)
    obj = build_objective(cfg.objective, encoder)
    ds = RandomCropDataset(resolve_store(cfg.data), cfg.data.crop_size, cfg.data.num_channels, length=4, transform=obj.view_transform())
    batch = next(iter(DataLoader(ds, batch_size=4)))
    out = obj(batch)
    assert torch.isfinite(out.loss), out.terms
    out.loss.backward()
    grads = [p.grad for p in encoder.parameters() if p.requires_grad and p.grad is not None]
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)
    obj.on_train_step_end(1, 10)
