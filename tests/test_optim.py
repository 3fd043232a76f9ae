"""Parameter groups come from the encoder's metadata (one builder), timm agrees, LAMB/LARS build."""

from __future__ import annotations

import pytest
import torch
from timm.optim import param_groups_layer_decay

from ssl_med.encoder import Encoder
from ssl_med.optim import build_optimizer, layer_decay_scales, param_groups
from ssl_med.registry import BACKBONES, OBJECTIVES

TINY = {"embed_dim": 48, "depth": 2, "patch_size": 4, "img_size": 16, "spatial_dims": 2}


def build(name: str) -> Encoder:
    torch.manual_seed(0)
    return BACKBONES.build(name, **TINY, **({} if name == "chada_vit" else {"in_chans": 1}))


@pytest.mark.parametrize("name", BACKBONES.names())
def test_every_backbone_answers_the_metadata(name: str) -> None:
    enc = build(name)
    names = {n for n, _ in enc.named_parameters()}
    assert "mask_token" in enc.no_weight_decay() & names  # names of absent optional tokens are allowed
    assert enc.patch_embed_names() and enc.patch_embed_names() <= names
    for i, block in enumerate(enc.blocks):
        assert {enc.layer_id(f"blocks.{i}.{n}") for n, _ in block.named_parameters()} == {i + 1}
    assert {enc.layer_id(n) for n in enc.patch_embed_names()} == {0}
    assert {enc.layer_id(f"norm.{n}") for n, _ in enc.norm.named_parameters()} <= {enc.depth + 1}
    assert all(0 <= enc.layer_id(n) <= enc.depth + 1 for n in names)


@pytest.mark.parametrize("name", BACKBONES.names())
def test_layer_scales_match_timm(name: str) -> None:
    """timm's ``param_groups_layer_decay`` reads ``group_matcher()`` and numbers layers as we do."""
    enc = build(name)
    ours = layer_decay_scales(enc, 0.5)
    params = dict(enc.named_parameters())
    theirs = {}
    for group in param_groups_layer_decay(enc, 0.05, no_weight_decay_list=enc.no_weight_decay(), layer_decay=0.5):
        theirs |= {n: group["lr_scale"] for n, p in params.items() if any(p is q for q in group["params"])}
    assert ours == {n: theirs[n] for n in ours if n in theirs}
    decay = {id(p) for g in param_groups(enc, 0.05, no_weight_decay=enc.no_weight_decay()) if g["apply_wd"] for p in g["params"]}
    timm_decay = {id(p) for g in param_groups_layer_decay(enc, 0.05, no_weight_decay_list=enc.no_weight_decay()) if g["weight_decay"] for p in g["params"]}
    assert decay == timm_decay


def test_groups_cover_each_trainable_parameter_once() -> None:
    objective = OBJECTIVES.build("mae", encoder=build("vit"))
    groups = param_groups(objective, 0.05, no_weight_decay=objective.no_weight_decay(), lr_scale={}, lr=1e-3)
    seen = [id(p) for g in groups for p in g["params"]]
    assert sorted(seen) == sorted(id(p) for p in objective.parameters() if p.requires_grad)
    no_decay = {id(p) for g in groups if not g["apply_wd"] for p in g["params"]}
    assert id(objective.decoder.mask_token) in no_decay and id(objective.encoder.cls_token) in no_decay
    assert id(objective.encoder.blocks[0].attn.qkv.weight) not in no_decay
    assert all(g["lr"] == 1e-3 * g["lr_scale"] for g in groups)


@pytest.mark.parametrize(("name", "kind"), [("adamw", torch.optim.AdamW), ("lamb", None), ("lars", None), ("sgd", torch.optim.SGD)])
def test_optimizer_choices_take_a_step(name: str, kind: type | None) -> None:
    enc = build("vit")
    opt = build_optimizer(param_groups(enc, 0.05), name, lr=1e-3, weight_decay=0.05, betas=(0.9, 0.95))
    assert kind is None or type(opt) is kind
    before = enc.blocks[0].attn.qkv.weight.detach().clone()
    enc(torch.rand(2, 1, 16, 16)).pooled.sum().backward()
    opt.step()
    assert not torch.equal(before, enc.blocks[0].attn.qkv.weight)
