"""``trainer=fsdp``: the per-block wrap policy every backbone declares, FSDP2 sharding in one process
(mixed-precision policy, DINO's EMA teacher, the gathered export), and a real 2-process run on the
CPU over gloo whose sharded checkpoint resumes exactly, exports an ordinary encoder and is itself
exported on one process; the job reports its encoder once."""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from hydra import compose, initialize_config_module
from safetensors.torch import load_file
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.utils.data import DataLoader

import ssl_med as ssl_med_package
from ssl_med.config import ConfigError, parse_pretrain_config
from ssl_med.data.crops import RandomCropDataset
from ssl_med.data.datamodule import resolve_store
from ssl_med.encoder import Encoder
from ssl_med.export import export_encoder
from ssl_med.objective import Objective
from ssl_med.registry import BACKBONES
from ssl_med.train import run as run_module
from ssl_med.train.checkpoints import checkpoint_problem, consolidate_checkpoint, remove_partial_saves
from ssl_med.train.geometry import prepare_pretrain_config
from ssl_med.train.run import build_encoder, build_objective
from ssl_med.train.sharding import (
    ShardedStrategy,
    build_strategy,
    complete_optimizer_state,
    full_encoder,
    mixed_precision,
    shard_objective,
    sharding_units,
)

TINY = {"embed_dim": 48, "depth": 2}


def build(backbone: str, objective: str, *overrides: str) -> tuple[dict[str, Any], Objective, dict[str, Any]]:
    """A tiny ``backbone`` x ``objective`` as ``ssl_med pretrain`` composes it, and a batch of 2 real crops."""
    args = [f"backbone={backbone}", f"objective={objective}", *overrides]
    with initialize_config_module(config_module="ssl_med.conf", version_base="1.3"):
        cfg = prepare_pretrain_config(compose(config_name="pretrain", overrides=args), args)
    torch.manual_seed(0)
    backbone_cfg = {**cfg.backbone, **TINY}
    obj = build_objective(cfg.objective, build_encoder(backbone_cfg))
    ds = RandomCropDataset(resolve_store(cfg.data), cfg.data.crop_size, cfg.data.num_channels, length=2, transform=obj.view_transform())
    return backbone_cfg, obj, next(iter(DataLoader(ds, batch_size=2)))


@pytest.mark.parametrize("backbone", BACKBONES.names())
def test_every_backbone_declares_the_class_of_each_of_its_blocks(backbone: str) -> None:
    _, obj, _ = build(backbone, "mae", "objective.decoder_depth=1", "objective.decoder_dim=32", "objective.decoder_heads=2")
    encoder = obj.encoder
    assert encoder.block_classes, f"{backbone} declares no block classes"
    assert all(isinstance(block, encoder.block_classes) for block in encoder.blocks)
    units = sharding_units(obj, encoder.block_classes)
    assert units[-1] is obj  # the root comes last, after its children
    assert sum(any(u is b for u in units) for b in encoder.blocks) == encoder.depth
    assert all(not isinstance(u, Encoder) for u in units)  # encoders are no units of their own


def test_mixed_precision_policy_follows_trainer_precision() -> None:
    bf16 = mixed_precision("bf16-mixed")
    assert (bf16.param_dtype, bf16.reduce_dtype) == (torch.bfloat16, torch.float32)
    assert mixed_precision("32-true").param_dtype is None
    with pytest.raises(ValueError, match="16-mixed"):
        mixed_precision("16-mixed")
    assert isinstance(build_strategy("fsdp"), ShardedStrategy)
    assert build_strategy("ddp") == "ddp"


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[DeviceMesh]:
    """A one-process gloo group: FSDP2 shards over one rank exactly as over many (DTensors, hooks)."""
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        yield init_device_mesh("cpu", (1,))
    finally:
        dist.destroy_process_group()


def test_sharded_mae_trains_in_bf16_and_exports_a_full_encoder(mesh: DeviceMesh) -> None:
    backbone, obj, batch = build("vit", "mae", "objective.decoder_depth=1", "objective.decoder_dim=32", "objective.decoder_heads=2")
    before = {k: v.clone() for k, v in obj.encoder.state_dict().items()}
    assert shard_objective(obj, mesh, mixed_precision("bf16-mixed")) == 3  # 2 encoder + 1 decoder blocks
    assert all(isinstance(b, FSDPModule) for b in obj.encoder.blocks) and isinstance(obj, FSDPModule)
    assert all(isinstance(p, DTensor) and p.dtype == torch.float32 for p in obj.parameters())  # sharded float32
    seen: list[torch.dtype] = []
    obj.encoder.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(m.norm1.weight.dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = obj(batch)
    assert seen == [torch.bfloat16]  # all-gathered for compute in bf16
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in obj.encoder.blocks.parameters())
    exported = full_encoder(obj.encoder, backbone)
    assert not any(isinstance(p, DTensor) for p in exported.parameters())
    for name, value in exported.state_dict().items():
        torch.testing.assert_close(value, before[name], rtol=0, atol=0)


@pytest.mark.parametrize("backbone", BACKBONES.names())
def test_every_backbone_sharded_gives_the_unsharded_loss_and_gradients(backbone: str, mesh: DeviceMesh) -> None:
    _, obj, batch = build(backbone, "mae", "objective.decoder_depth=1", "objective.decoder_dim=32", "objective.decoder_heads=2")
    reference = copy.deepcopy(obj)
    torch.manual_seed(1)
    expected = reference(batch).loss
    expected.backward()
    shard_objective(obj, mesh, mixed_precision("32-true"))
    torch.manual_seed(1)
    loss = obj(batch).loss
    loss.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)
    grads = {n: p.grad for n, p in reference.named_parameters() if p.grad is not None}
    for name, p in obj.named_parameters():
        if name in grads:
            torch.testing.assert_close(p.grad.full_tensor(), grads[name], rtol=1e-5, atol=1e-7, msg=name)


def test_sharded_dino_updates_its_sharded_teacher(mesh: DeviceMesh) -> None:
    _, obj, batch = build("vit", "dino", "objective.hidden_dim=64", "objective.bottleneck_dim=32", "objective.out_dim=64")
    shard_objective(obj, mesh, mixed_precision("32-true"))
    teacher_blocks = [m for m in obj.teacher.modules() if isinstance(m, obj.encoder.block_classes)]
    assert teacher_blocks and all(isinstance(b, FSDPModule) for b in teacher_blocks)
    teacher_before = [p.full_tensor().clone() for p in obj.teacher.parameters()]
    out = obj(batch)
    out.loss.backward()
    with torch.no_grad():
        for p in obj.encoder.parameters():
            p.add_(torch.ones_like(p))  # a stand-in for the optimiser step, on the shards
    obj.on_train_step_end(1, 10)
    moved = [not torch.equal(p.full_tensor(), b) for p, b in zip(obj.teacher.parameters(), teacher_before, strict=True)]
    assert any(moved)


def test_parameters_without_gradients_get_their_initial_optimizer_state_and_nothing_else_changes() -> None:
    used, unused = torch.nn.Parameter(torch.ones(3)), torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.AdamW([used, unused], lr=0.1, weight_decay=0.5)
    used.grad = torch.full((3,), 2.0)
    opt.step()
    state_before = {k: v.clone() for k, v in opt.state[used].items()}
    value_before, grad = used.detach().clone(), used.grad
    complete_optimizer_state(opt)
    assert unused in opt.state and torch.equal(opt.state[unused]["exp_avg"], torch.zeros(2))
    assert torch.equal(unused.detach(), torch.ones(2)) and unused.grad is None
    assert torch.equal(used.detach(), value_before) and used.grad is grad
    assert all(torch.equal(opt.state[used][k], v) for k, v in state_before.items())
    assert opt.param_groups[0]["lr"] == 0.1


def test_sharded_checkpoint_folders_are_checked(tmp_path: Path) -> None:
    folder = tmp_path / "last.ckpt"
    folder.mkdir()
    assert "incomplete sharded checkpoint" in checkpoint_problem(folder)
    (folder / ".metadata").write_bytes(b"x")
    torch.save({"global_step": 2}, folder / "meta.pt")
    assert checkpoint_problem(folder) is None
    partial = tmp_path / ".step0000004.ckpt.tmp"  # a sharded save killed before its rename
    (partial / "sub").mkdir(parents=True)
    assert remove_partial_saves(tmp_path) == [partial] and not partial.exists() and folder.is_dir()


#: constant learning rate and weight decay, so that a 2-step run resumed to 4 steps follows the same
#: schedules as a 4-step run
TWO_RANKS = [
    "trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.precision=32-true",
    "backbone.embed_dim=48", "backbone.depth=2", "objective.decoder_dim=32", "objective.decoder_depth=1",
    "objective.decoder_heads=2", "data.crop_size=[32,32]", "data.num_workers=0", "data.samples_per_epoch=64",
    "data.batch_size=4", "trainer.progress_bar=false", "optim.warmup_steps=0", "optim.lr=1e-3",
    "optim.min_lr=1e-3", "trainer.checkpoint_every_n_steps=2", "trainer.preview_every_n_steps=1", "logger=[]",
]  # fmt: skip


def ssl_med(*args: str, cwd: Path) -> str:
    """Run ``ssl_med *args`` (every process of the job writes to the same pipes); returns its stdout."""
    result = subprocess.run([sys.executable, "-m", "ssl_med", *args], cwd=cwd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_two_process_fsdp_on_cpu_resumes_exactly_and_exports(tmp_path: Path) -> None:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    stdout = ssl_med("pretrain", *TWO_RANKS, "trainer.max_steps=4", f"hydra.run.dir={straight}", cwd=tmp_path)
    assert stdout.count("encoder written to") == 1  # by global rank 0 alone
    ssl_med("pretrain", *TWO_RANKS, "trainer.max_steps=2", f"hydra.run.dir={resumed}", cwd=tmp_path)
    last = resumed / "checkpoints" / "last.ckpt"
    assert last.is_dir() and len(list(last.glob("*.distcp"))) == 2  # one shard file per rank
    assert not list(last.parent.glob(".*"))  # written to temporary folders, renamed into place
    ssl_med(  # continues from the sharded step-2 checkpoint, now with activation checkpointing
        "pretrain", *TWO_RANKS, "trainer.max_steps=4", "trainer.activation_checkpointing=true", f"hydra.run.dir={resumed}", cwd=tmp_path
    )
    a = load_file(straight / "encoder" / "model.safetensors")
    b = load_file(resumed / "encoder" / "model.safetensors")
    assert a.keys() == b.keys()
    for name, value in a.items():
        assert torch.equal(value, b[name]), name
    full = torch.load(consolidate_checkpoint(last, tmp_path / "last-full.ckpt"), weights_only=True)
    assert full["global_step"] == 4
    for name, value in b.items():
        assert torch.equal(full["state_dict"][f"objective.encoder.{name}"], value), name
    assert isinstance(ssl_med_package.load_pretrained(straight / "encoder"), Encoder)  # an ordinary export
    exported = load_file(export_encoder(last, tmp_path / "from-shards", trust_pickle=True) / "model.safetensors")  # one process
    assert exported.keys() == b.keys() and all(torch.equal(exported[name], b[name]) for name in b)


def test_online_eval_is_refused_with_a_sharded_strategy_before_any_work(tmp_path: Path) -> None:
    with initialize_config_module(config_module="ssl_med.conf", version_base="1.3"):
        cfg = parse_pretrain_config(compose(config_name="pretrain", overrides=["trainer=fsdp", "online_eval.data=breastmnist"]))
    with pytest.raises(ConfigError, match=r"online_eval\.data=null"):
        run_module.pretrain(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
