"""Adding a backbone needs only its module and its YAML: a toy backbone, written to a temporary folder,
is composed by Hydra (``backbone=toy`` on a search path), trained one optimiser step with every
registered objective (parameter groups from its encoder metadata) and exported and loaded back."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from torch.utils.data import DataLoader

from ssl_med.build import build_encoder
from ssl_med.data.crops import RandomCropDataset
from ssl_med.data.datamodule import resolve_store
from ssl_med.export import load_pretrained, save_encoder
from ssl_med.registry import BACKBONES, OBJECTIVES
from ssl_med.train.geometry import prepare_pretrain_config
from ssl_med.train.module import PretrainModule
from ssl_med.train.run import build_objective

TOY_MODULE = '''
"""A toy token model: residual MLP blocks that also see the mean token."""
from torch import nn

from ssl_med.encoder import TokenEncoder
from ssl_med.registry import BACKBONES


class MeanMixBlock(nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        h = self.norm(x)
        return x + self.mlp(h + h.mean(dim=1, keepdim=True))


@BACKBONES.register("toy")
class ToyEncoder(TokenEncoder):
    def __init__(self, spatial_dims=2, in_chans=1, img_size=32, patch_size=8, embed_dim=32, depth=2):
        super().__init__(spatial_dims, in_chans, patch_size, embed_dim, depth, img_size)
        self.blocks = nn.ModuleList(MeanMixBlock(embed_dim) for _ in range(depth))
'''

TOY_YAML = """\
name: toy
spatial_dims: ${data.spatial_dims}
in_chans: ${data.num_channels}
img_size: ${data.crop_size}
patch_size: ${data.patch_size}
embed_dim: 32
depth: 2
"""


@pytest.fixture(scope="module")
def toy_conf(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Writes ``toy_backbone.py`` and ``conf/backbone/toy.yaml``, imports the module (which registers
    ``toy``); unregisters it afterwards."""
    root = tmp_path_factory.mktemp("toy")
    (root / "toy_backbone.py").write_text(TOY_MODULE)
    (root / "conf" / "backbone").mkdir(parents=True)
    (root / "conf" / "backbone" / "toy.yaml").write_text(TOY_YAML)
    sys.path.insert(0, str(root))
    try:
        importlib.import_module("toy_backbone")
        yield root / "conf"
    finally:
        sys.path.remove(str(root))
        sys.modules.pop("toy_backbone", None)
        BACKBONES._items.pop("toy", None)


@pytest.mark.parametrize("objective", OBJECTIVES.names())
def test_toy_backbone_trains_with_every_objective_and_exports(objective: str, toy_conf: Path, tmp_path: Path) -> None:
    problem = OBJECTIVES.get(objective).pairing_problem("toy")
    if problem:
        pytest.skip(problem)
    overrides = [f"hydra.searchpath=[file://{toy_conf}]", "backbone=toy", f"objective={objective}"]
    with initialize_config_module(config_module="ssl_med.conf", version_base="1.3"):
        cfg = prepare_pretrain_config(compose(config_name="pretrain", overrides=overrides), overrides)
    torch.manual_seed(0)
    encoder = build_encoder(cfg.backbone)
    assert type(encoder).__name__ == "ToyEncoder"
    obj = build_objective(cfg.objective, encoder)
    store = resolve_store(cfg.data)
    ds = RandomCropDataset(store, cfg.data.crop_size, cfg.data.num_channels, length=2, transform=obj.view_transform())
    batch = next(iter(DataLoader(ds, batch_size=2)))

    optimizer = PretrainModule(obj, cfg.optim, max_steps=10).configure_optimizers()
    before = [p.detach().clone() for p in encoder.blocks[0].parameters()]
    out = obj(batch)
    assert torch.isfinite(out.loss), out.terms
    out.loss.backward()
    assert any(float(p.grad.abs().sum()) > 0 for p in encoder.parameters() if p.grad is not None)
    optimizer.step()
    obj.on_train_step_end(1, 10)
    assert any(not torch.equal(a, b) for a, b in zip(before, encoder.blocks[0].parameters()))

    save_encoder(encoder, tmp_path / "export", {"backbone": cfg.backbone, "objective": cfg.objective}, model_card=False)
    loaded = load_pretrained(tmp_path / "export")
    x = torch.rand(1, cfg.data.num_channels, *cfg.backbone["img_size"])
    torch.testing.assert_close(loaded(x).pooled, encoder.eval()(x).pooled)
