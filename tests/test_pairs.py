"""Every registered backbone pairs with every registered objective, in 2D and 3D, through the configs.

``backbone=B objective=O`` alone composes a config that passes the start-up geometry check (each
objective's default data, the backbone built for the views it sees); the other dimensionality is
chosen with ``data=``. One optimiser step per pair on real demo crops, at tiny width and depth (the
geometry stays the composed one): the loss is finite and the encoder gets gradients.
(Each objective's own tests check that it learns; this checks the wiring of the whole matrix.)
The same matrix runs again under CPU bf16 autocast (``trainer.precision=bf16-mixed``) against its
float32 loss.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_module
from torch import Tensor, nn
from torch.utils.data import DataLoader

from ssl_med.config import PretrainConfig
from ssl_med.data.crops import RandomCropDataset
from ssl_med.data.datamodule import resolve_store
from ssl_med.objective import Objective
from ssl_med.registry import BACKBONES, OBJECTIVES
from ssl_med.train.geometry import prepare_pretrain_config, view_geometry
from ssl_med.train.run import build_encoder, build_objective

#: ``data=`` overrides for the dimensionality that is not the objective's default (VoCo defaults to 3D)
OTHER_DATA = {"voco": ["data=demo", "data.crop_size=[96,96]"]}
TINY_BACKBONE = {"embed_dim": 48, "depth": 2}


def pair_param(b: str, o: str, d: str) -> Any:
    """The pair as a test parameter, skipped with the objective's reason when it does not pair with the
    backbone (``Objective.backbones``, e.g. bm_mae needs one token per (channel, patch))."""
    problem = OBJECTIVES.get(o).pairing_problem(b)
    return pytest.param(b, o, d, marks=pytest.mark.skip(reason=problem)) if problem else (b, o, d)


PAIRS = [pair_param(b, o, d) for b in BACKBONES.names() for o in OBJECTIVES.names() for d in ("default", "other")]


def test_bm_mae_pairs_with_both_vits() -> None:
    """bm_mae runs with ChAda-ViT and with the ViT (``backbone=vit objective=bm_mae`` builds its
    per-modality tokens); Mamba and xLSTM are skipped with the reason."""
    run = {p[:2] for p in PAIRS if not getattr(p, "marks", ())}
    assert {("vit", "bm_mae"), ("chada_vit", "bm_mae")} <= run
    assert ("mamba", "bm_mae") not in run and ("xlstm", "bm_mae") not in run


def compose_pretrain(*overrides: str) -> PretrainConfig:
    """``ssl_med pretrain *overrides``'s config as the command prepares it (parsed, geometry fitted)."""
    with initialize_config_module(config_module="ssl_med.conf", version_base="1.3"):
        raw = compose(config_name="pretrain", overrides=list(overrides))
    return prepare_pretrain_config(raw, overrides)


def build_pair(backbone: str, objective: str, data: str) -> tuple[nn.Module, Objective, dict[str, Any]]:
    """The pair's tiny encoder, its objective and one collated batch of two real demo crops (seeded)."""
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
    return encoder, obj, next(iter(DataLoader(ds, batch_size=2)))


def encoder_grads(encoder: nn.Module) -> list[Tensor]:
    """The encoder's parameter gradients after a backward pass (trainable parameters that got one)."""
    return [p.grad for p in encoder.parameters() if p.requires_grad and p.grad is not None]


@pytest.mark.parametrize(("backbone", "objective", "data"), PAIRS)
def test_pair_trains_one_step(backbone: str, objective: str, data: str) -> None:
    encoder, obj, batch = build_pair(backbone, objective, data)
    out = obj(batch)
    assert torch.isfinite(out.loss), out.terms
    out.loss.backward()
    grads = encoder_grads(encoder)
    assert grads and any(float(g.abs().sum()) > 0 for g in grads)
    obj.on_train_step_end(1, 10)


#: Relative tolerance between the bf16-autocast and the float32 loss of the same weights and batch.
#: bf16 keeps 8 significant bits (a relative rounding of up to 2^-9 ~ 2e-3 per cast); the matmuls of
#: two tiny blocks, a head or decoder and the loss inputs add a few dozen such roundings, which
#: measure at most 8.5e-3 over the MAE, Hi-End-MAE, DINO and graph-matching pairs. 5e-2 leaves room
#: for other CPUs' bf16 kernels; wrong dtype paths are caught by the other assertions (a crash, a
#: bf16 loss, a non-finite value, a float32 buffer or EMA teacher left in bf16).
BF16_RTOL = 5e-2
#: VoCo's inter-volume term takes as negatives the entries where the teacher's ReLU(cosine) is
#: exactly 0: a discontinuous selection that bf16 rounding of near-zero cosines flips (measured up
#: to 4.8e-2 with float32 loss terms), so VoCo gets twice the tolerance.
BF16_RTOL_BY_OBJECTIVE = {"voco": 1e-1}


@pytest.mark.parametrize(("backbone", "objective", "data"), PAIRS)
def test_pair_bf16_autocast_matches_float32(backbone: str, objective: str, data: str) -> None:
    """The pair under ``torch.autocast("cpu", dtype=torch.bfloat16)`` (what ``trainer.precision=bf16-mixed``
    runs): a finite float32 loss within :data:`BF16_RTOL` (:data:`BF16_RTOL_BY_OBJECTIVE`) of the
    float32 loss of the same weights, batch and random draws; finite, non-zero encoder gradients;
    parameters, EMA teachers and buffers stay float32 through the step hook."""
    encoder, obj, batch = build_pair(backbone, objective, data)
    reference = copy.deepcopy(obj)  # float32 run on its own copy: forwards may update buffers (centers)
    torch.manual_seed(1)
    with torch.no_grad():
        loss32 = reference(copy.deepcopy(batch)).loss
    torch.manual_seed(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = obj(batch)
    assert out.loss.dtype == torch.float32, out.loss.dtype
    assert torch.isfinite(out.loss), out.terms
    out.loss.backward()
    grads = encoder_grads(encoder)
    assert grads and all(bool(torch.isfinite(g).all()) for g in grads)
    assert any(float(g.abs().sum()) > 0 for g in grads)
    bf16, fp32 = out.loss.item(), loss32.item()
    assert abs(bf16 - fp32) <= BF16_RTOL_BY_OBJECTIVE.get(objective, BF16_RTOL) * abs(fp32), (bf16, fp32)
    obj.on_train_step_end(1, 10)
    kept = {k: v.dtype for k, v in obj.state_dict().items() if v.is_floating_point() and v.dtype != torch.float32}
    assert not kept, kept
