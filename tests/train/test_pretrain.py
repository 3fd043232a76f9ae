"""End-to-end pretraining on the demo data: outputs, falling loss, export round trip, resume."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import ssl_med
from ssl_med.config import PretrainConfig, parse_pretrain_config
from ssl_med.train import run as run_module
from ssl_med.train.module import PretrainModule
from ssl_med.train.schedules import warmup_cosine

TINY = [
    "backbone.embed_dim=48",
    "backbone.depth=2",
    "objective.decoder_dim=32",
    "objective.decoder_depth=1",
    "objective.decoder_heads=2",
    "data.crop_size=[32,32]",
    "data.batch_size=16",
    "data.num_workers=0",
    "data.samples_per_epoch=128",
    "trainer.progress_bar=false",
    "optim.warmup_steps=5",
    "optim.lr=2e-3",
]


def config(*overrides: str) -> PretrainConfig:
    with initialize_config_module(config_module="ssl_med.conf", version_base="1.3"):
        return parse_pretrain_config(compose(config_name="pretrain", overrides=[*TINY, *overrides]))


def scalars(run_dir: Path, tag: str) -> list[float]:
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return [e.value for e in acc.Scalars(tag)]


def test_warmup_cosine_schedule() -> None:
    assert warmup_cosine(0, 100, 1.0, 0.0, warmup_steps=10) == pytest.approx(0.1)
    assert warmup_cosine(9, 100, 1.0, 0.0, warmup_steps=10) == pytest.approx(1.0)
    assert warmup_cosine(55, 100, 1.0, 0.0, warmup_steps=10) == pytest.approx(0.5)
    assert warmup_cosine(100, 100, 1.0, 0.1, warmup_steps=10) == pytest.approx(0.1)
    assert warmup_cosine(500, 100, 1.0, 0.1) == pytest.approx(0.1)


def test_pretrain_writes_outputs_and_learns(tmp_path: Path) -> None:
    cfg = config("trainer.max_steps=60", "trainer.log_every_n_steps=1", "trainer.checkpoint_every_n_steps=30", "trainer.preview_every_n_steps=30")
    export_dir = run_module.pretrain(cfg, tmp_path)
    assert (tmp_path / "resolved_config.yaml").is_file()
    assert (tmp_path / "checkpoints" / "last.ckpt").is_file()
    assert any((tmp_path / "checkpoints").glob("step*.ckpt"))
    losses = scalars(tmp_path, "train/loss")
    assert len(losses) >= 10
    first, last = losses[:5], losses[-20:]  # per-batch losses are noisy: compare averages
    assert sum(last) / len(last) < 0.85 * sum(first) / len(first), losses
    assert min(scalars(tmp_path, "collapse/embedding_std")) > 0.0
    assert min(scalars(tmp_path, "collapse/effective_rank")) >= 1.0  # logged on every logged step
    assert scalars(tmp_path, "train/samples_per_s")
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert acc.Tags()["images"], "reconstruction previews are logged"
    assert (tmp_path / "training_curves.png").stat().st_size > 1000

    encoder = ssl_med.load_pretrained(export_dir)
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    trained = {k.removeprefix("objective.encoder."): v for k, v in ckpt["state_dict"].items() if k.startswith("objective.encoder.")}
    for name, value in encoder.state_dict().items():
        torch.testing.assert_close(value, trained[name])
    x = torch.rand(2, 1, 32, 32)
    assert encoder(x).pooled.shape == (2, 48)


class Crash(RuntimeError):
    pass


def test_interrupted_run_resumes_from_last_checkpoint(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = config("trainer.max_steps=20", "trainer.checkpoint_every_n_steps=5", "trainer.log_every_n_steps=1")
    original_step = PretrainModule.training_step

    def crashing_step(self, batch, batch_idx):
        if self.global_step == 12:
            raise Crash("simulated kill at step 12")
        return original_step(self, batch, batch_idx)

    monkeypatch.setattr(PretrainModule, "training_step", crashing_step)
    with pytest.raises(Crash):
        run_module.pretrain(cfg, tmp_path)
    saved = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 10
    monkeypatch.setattr(PretrainModule, "training_step", original_step)

    seen: dict[str, object] = {}
    original_fit_start = PretrainModule.on_fit_start

    def record_start(self):
        seen["step"] = self.trainer.global_step
        seen["exp_avg"] = [s["exp_avg"].clone() for s in self.trainer.optimizers[0].state.values()]
        return original_fit_start(self)

    monkeypatch.setattr(PretrainModule, "on_train_start", record_start)
    run_module.pretrain(cfg, tmp_path)  # resume=auto by default
    assert seen["step"] == 10
    saved_avgs = [s["exp_avg"] for s in saved["optimizer_states"][0]["state"].values()]
    for a, b in zip(seen["exp_avg"], saved_avgs):
        torch.testing.assert_close(a, b)
    final = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert final["global_step"] == 20
    # the learning-rate schedule continued from step 10 rather than restarting its warmup
    lrs = scalars(tmp_path, "train/lr")
    assert lrs[-1] == pytest.approx(warmup_cosine(19, 20, cfg.optim.lr, cfg.optim.min_lr, cfg.optim.warmup_steps), rel=1e-4)


def test_resume_never_and_bad_path(tmp_path: Path) -> None:
    assert run_module.resume_checkpoint("never", tmp_path) is None
    assert run_module.resume_checkpoint("auto", tmp_path) is None
    from ssl_med.config import ConfigError

    with pytest.raises(ConfigError, match="resume"):
        run_module.resume_checkpoint(str(tmp_path / "nope.ckpt"), tmp_path)


def test_3d_pretrain_smoke(tmp_path: Path) -> None:
    cfg = config("data=demo3d", "data.crop_size=[16,16,16]", "data.batch_size=4", "trainer.max_steps=3", "data.num_workers=0",
                 "trainer.activation_checkpointing=true")  # fmt: skip
    run_module.pretrain(cfg, tmp_path)
    enc = ssl_med.load_pretrained(tmp_path / "encoder")
    assert enc.spatial_dims == 3
    assert enc(torch.rand(1, 1, 16, 16, 16)).patch_tokens.shape == (1, 8, 48)


def test_bf16_mixed_pretrain_runs(tmp_path: Path) -> None:
    """``trainer.precision=bf16-mixed`` (Lightning's bf16 autocast, here on the CPU) with the default
    objective: the run ends with finite logged losses and exports a float32 encoder (every pair's
    bf16 step against float32: tests/test_pairs.py)."""
    cfg = config("trainer.precision=bf16-mixed", "trainer.max_steps=2", "trainer.log_every_n_steps=1")
    export_dir = run_module.pretrain(cfg, tmp_path)
    losses = scalars(tmp_path, "train/loss")
    assert losses and all(torch.isfinite(torch.tensor(losses))), losses
    encoder = ssl_med.load_pretrained(export_dir)
    assert {p.dtype for p in encoder.parameters()} == {torch.float32}


def test_mae_crops_travel_raw_and_are_normalised_after_the_transfer() -> None:
    """data.normalise=batch: MAE's views only move voxels, so 1-channel crops can leave the workers in
    their stored dtype and PretrainModule.on_after_batch_transfer makes them float32 [0, 1]; DINO's
    cannot. auto picks this only on an accelerator (on the CPU the workers normalise)."""
    from dataclasses import replace

    from ssl_med.data.datamodule import CropDataModule

    cfg = config("data=demo3d", "data.crop_size=[16,16,16]", "data.batch_size=2")
    objective = run_module.build_objective(cfg.objective, run_module.build_encoder(cfg.backbone))
    assert CropDataModule(cfg.data, objective.view_transform(), 0, True).normalise_mode() == "worker"  # CPU
    data = CropDataModule(replace(cfg.data, normalise="batch"), objective.view_transform(), 0, True)
    data.setup()
    assert data.dataset is not None and data.dataset.normalise == "batch"
    batch = next(iter(data.train_dataloader()))
    assert "intensity_window" in batch
    out = PretrainModule(objective, cfg.optim, 10).on_after_batch_transfer(batch, 0)
    assert out["image"].dtype == torch.float32 and "intensity_window" not in out
    assert 0.0 <= float(out["image"].min()) and float(out["image"].max()) <= 1.0
    assert torch.isfinite(objective(out).loss)
    assert CropDataModule(cfg.data, objective.view_transform(), 0, geometric_views=False).normalise_mode() == "worker"
    with pytest.raises(ValueError, match="normalise=batch"):
        CropDataModule(replace(cfg.data, normalise="batch"), objective.view_transform(), 0, geometric_views=False)


def test_pretrain_then_evaluate(tmp_path: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSL_MED_SHARED_DATA", str(shared_data))
    cfg = config("trainer.max_steps=2", "evaluate=[knn]", "evaluate_on=breastmnist")
    run_module.pretrain(cfg, tmp_path)
    import json

    results = json.loads((tmp_path / "eval" / "knn-breastmnist" / "results.json").read_text())
    assert [r["encoder"] for r in results["rows"]] == ["pretrained", "random-init"]
    assert 0.0 <= results["rows"][0]["metrics"]["accuracy"] <= 1.0
    assert (tmp_path / "eval" / "knn-breastmnist" / "results.md").is_file()
