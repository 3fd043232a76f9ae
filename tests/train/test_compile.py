"""``trainer.compile``: the compiled encoder and heads give the eager loss and gradients, a full run
trains through them, and a backbone that does not compile falls back to eager with one log line.

Tolerances (float32, inductor on the CPU): loss within 1e-5 relative, gradients within 1e-4 relative
(+1e-6 absolute) on one fixed batch; per-step losses of a 3-step run within 1e-4 relative.
"""

from __future__ import annotations

import copy
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_module
from torch import Tensor

from ssl_med.build import build_encoder
from ssl_med.config import OptimConfig, PretrainConfig, parse_pretrain_config
from ssl_med.train import run as run_module
from ssl_med.train.compile import CompileSettings, compile_settings
from ssl_med.train.module import PretrainModule
from ssl_med.train.run import build_objective

TINY_VIT = {"name": "vit", "spatial_dims": 2, "in_chans": 1, "img_size": [32, 32], "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3}
TINY_MAE = {"name": "mae", "decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2}


@pytest.fixture(autouse=True)
def default_stance() -> Iterator[None]:
    """A fallback turns compiled code off process-wide; give every test the default back."""
    yield
    torch.compiler.set_stance("default")
    torch._dynamo.reset()


def tiny_module(compile: CompileSettings | None) -> PretrainModule:
    torch.manual_seed(0)
    objective = build_objective(dict(TINY_MAE), build_encoder(dict(TINY_VIT)))
    return PretrainModule(objective, OptimConfig(), max_steps=10, compile=compile, backbone="vit")


def fixed_batch() -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(1)
    return {"image": torch.rand(4, 1, 32, 32, generator=gen), "mask_noise": torch.rand(4, 16, generator=gen)}


def loss_and_grads(module: PretrainModule, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
    module.configure_model()
    loss = module.objective(batch).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in module.objective.named_parameters() if p.grad is not None}
    return loss.detach(), grads


def test_compiled_step_matches_eager_on_a_fixed_batch() -> None:
    batch = fixed_batch()
    eager_loss, eager_grads = loss_and_grads(tiny_module(None), batch)
    compiled = tiny_module(CompileSettings())
    compiled_loss, compiled_grads = loss_and_grads(compiled, copy.deepcopy(batch))
    assert compiled.objective.encoder._compiled_call_impl is not None  # the encoder really was compiled
    assert compiled.objective.decoder._compiled_call_impl is not None
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=0)
    assert compiled_grads.keys() == eager_grads.keys()
    for name, grad in eager_grads.items():
        torch.testing.assert_close(compiled_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    assert [n for n, _ in compiled.objective.named_parameters()] == [n for n, _ in tiny_module(None).objective.named_parameters()]


def broken_backend(graph: torch.fx.GraphModule, inputs: list[Any]) -> Any:
    raise RuntimeError("this backend compiles nothing")


def test_a_backbone_that_does_not_compile_runs_eagerly_with_one_line(caplog: pytest.LogCaptureFixture) -> None:
    batch = fixed_batch()
    eager_loss, _ = loss_and_grads(tiny_module(None), batch)
    module = tiny_module(CompileSettings(backend=broken_backend))
    module.configure_model()
    with caplog.at_level(logging.WARNING, logger="ssl_med.train.compile"):
        out = module.compile_guard.forward(lambda: module.objective(batch))
        again = module.compile_guard.forward(lambda: module.objective(batch))
    torch.testing.assert_close(out.loss, eager_loss)
    torch.testing.assert_close(again.loss, eager_loss)
    # warnings only: the INFO line of configure_model() is captured too when an earlier test left the
    # logger at INFO
    lines = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(lines) == 1 and "\n" not in lines[0], lines
    assert "torch.compile failed for backbone 'vit'" in lines[0] and "training continues eagerly" in lines[0]


def test_compile_settings_come_from_the_trainer_config() -> None:
    class Trainer:
        compile = True
        compile_mode = "max-autotune-no-cudagraphs"

    assert compile_settings(Trainer()) == CompileSettings(mode="max-autotune-no-cudagraphs")
    assert compile_settings(object()) is None  # off by default
    with pytest.raises(ValueError, match=r"trainer\.compile_mode='fastest'"):
        CompileSettings(mode="fastest")


def run_config(tmp: Path, compile: bool) -> PretrainConfig:
    overrides = [
        "backbone.embed_dim=48", "backbone.depth=2", "objective.decoder_dim=32", "objective.decoder_depth=1",
        "objective.decoder_heads=2", "data.crop_size=[32,32]", "data.batch_size=8", "data.num_workers=0",
        "data.samples_per_epoch=64", "trainer.progress_bar=false", "trainer.max_steps=3",
        "trainer.log_every_n_steps=1", "optim.warmup_steps=1", "logger=[]",
    ]  # fmt: skip
    with initialize_config_module(config_module="ssl_med.conf", version_base="1.3"):
        cfg = parse_pretrain_config(compose(config_name="pretrain", overrides=overrides))
    cfg.trainer.compile = compile  # the key trainer.compile of the command line
    return cfg


def step_losses(run_dir: Path) -> list[float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [row["train/loss"] for row in rows if "train/loss" in row]


def test_a_compiled_run_trains_like_an_eager_one(tmp_path: Path) -> None:
    run_module.pretrain(run_config(tmp_path, compile=False), tmp_path / "eager")
    run_module.pretrain(run_config(tmp_path, compile=True), tmp_path / "compiled")
    eager, compiled = step_losses(tmp_path / "eager"), step_losses(tmp_path / "compiled")
    assert len(eager) == 3 and len(compiled) == 3
    assert compiled == pytest.approx(eager, rel=1e-4)
    assert (tmp_path / "compiled" / "encoder" / "model.safetensors").is_file()
