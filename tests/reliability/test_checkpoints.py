"""Resume never unpickles code, even with ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``; an empty or damaged
``last.ckpt`` falls back to the newest good step checkpoint, and the run still ends where it would have."""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from ssl_med.config import ConfigError, PretrainConfig, parse_pretrain_config
from ssl_med.train import run as run_module
from ssl_med.train.callbacks import AtomicCheckpointIO
from ssl_med.train.module import PretrainModule

SMALL = ["backbone.embed_dim=48", "backbone.depth=1", "objective.decoder_dim=16", "objective.decoder_depth=1",
         "objective.decoder_heads=2", "data.crop_size=[32,32]", "data.batch_size=4", "data.num_workers=0",
         "data.samples_per_epoch=64", "trainer.progress_bar=false"]  # fmt: skip


def small_config(*overrides: str) -> PretrainConfig:
    with initialize_config_module(config_module="ssl_med.conf", version_base="1.3"):
        return parse_pretrain_config(compose(config_name="pretrain", overrides=[*SMALL, *overrides]))


class Payload:
    """Unpickling this calls ``open(marker, "w")``: a stand-in for any code a crafted file could run."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple:
        return (open, (self.marker, "w"))


@pytest.fixture()
def crafted(tmp_path: Path) -> tuple[Path, Path]:
    """A checkpoint-shaped file whose unpickling creates ``marker``; ``(checkpoint, marker)``."""
    path, marker = tmp_path / "crafted.ckpt", tmp_path / "pwned"
    torch.save({"state_dict": {}, "global_step": 0, "payload": Payload(marker)}, path)
    return path, marker


def test_the_payload_is_live(crafted) -> None:
    path, marker = crafted
    torch.load(path, weights_only=False)
    assert marker.exists()  # so its absence below means the loader refused it


def test_checkpoint_io_never_unpickles(crafted, monkeypatch) -> None:
    path, marker = crafted
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    for weights_only in (None, False):
        with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
            AtomicCheckpointIO().load_checkpoint(path, weights_only=weights_only)
    assert not marker.exists()


def test_resume_from_a_crafted_checkpoint_runs_no_code(crafted, tmp_path, monkeypatch) -> None:
    path, marker = crafted
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    cfg = small_config("trainer.max_steps=1", f"resume={path}")
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        run_module.pretrain(cfg, tmp_path / "run")
    assert not marker.exists()


@pytest.fixture()
def checkpoint_dir(tmp_path: Path) -> Path:
    """``step0000003.ckpt``, ``step0000006.ckpt`` and ``last.ckpt`` (step 6), small but real ``torch.save`` files."""
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    for name, step in (("step0000003.ckpt", 3), ("step0000006.ckpt", 6), ("last.ckpt", 6)):
        torch.save({"global_step": step, "state_dict": {"w": torch.arange(4096.0) + step}}, folder / name)
    return folder


@pytest.mark.parametrize("fault", ["emptied", "truncated", "flipped"])
def test_damaged_last_checkpoint_falls_back_to_the_newest_step(checkpoint_dir, faults, fault, caplog) -> None:
    inject, _ = faults.KINDS[fault]
    last = checkpoint_dir / "last.ckpt"
    inject(last) if fault != "flipped" else faults.flip_byte(last, len(last.read_bytes()) // 2)
    with caplog.at_level(logging.WARNING, logger="ssl_med.train.checkpoints"):
        found = run_module.resume_checkpoint("auto", checkpoint_dir)
    assert found == str(checkpoint_dir / "step0000006.ckpt")
    assert f"cannot resume from {last} (" in caplog.text and "resuming from" in caplog.text
    assert not last.exists() and (checkpoint_dir / "last.ckpt.damaged").exists()
    last = checkpoint_dir / "last.ckpt.damaged"
    with pytest.raises(ConfigError, match=r"last\.ckpt"):
        run_module.resume_checkpoint(str(last), checkpoint_dir)  # an explicit path is not replaced


def test_no_usable_checkpoint_is_an_error(checkpoint_dir) -> None:
    for path in checkpoint_dir.iterdir():
        path.write_bytes(b"")
    with pytest.raises(ConfigError, match=r"no usable checkpoint .* resume=never starts afresh"):
        run_module.resume_checkpoint("auto", checkpoint_dir)


class Crash(RuntimeError):
    pass


def test_run_resumes_from_the_step_checkpoint_to_the_same_weights(tmp_path, monkeypatch) -> None:
    cfg = small_config("trainer.max_steps=6", "trainer.checkpoint_every_n_steps=3", "optim.warmup_steps=2")
    run_module.pretrain(cfg, tmp_path / "straight")
    original_step = PretrainModule.training_step

    def crash_at_step_5(self, batch, batch_idx):
        if self.global_step == 5:
            raise Crash("killed at step 5")
        return original_step(self, batch, batch_idx)

    monkeypatch.setattr(PretrainModule, "training_step", crash_at_step_5)
    with pytest.raises(Crash):
        run_module.pretrain(cfg, tmp_path / "resumed")
    monkeypatch.setattr(PretrainModule, "training_step", original_step)
    (tmp_path / "resumed" / "checkpoints" / "last.ckpt").write_bytes(b"")
    run_module.pretrain(cfg, tmp_path / "resumed")
    straight, resumed = (
        torch.load(tmp_path / run / "checkpoints" / "last.ckpt", weights_only=True)
        for run in ("straight", "resumed")
    )
    assert resumed["global_step"] == straight["global_step"] == 6
    for key, value in straight["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key


def test_last_checkpoint_holds_the_final_steps(tmp_path) -> None:
    cfg = small_config("trainer.max_steps=5", "trainer.checkpoint_every_n_steps=3")
    run_module.pretrain(cfg, tmp_path / "run")
    folder = tmp_path / "run" / "checkpoints"
    last = torch.load(folder / "last.ckpt", weights_only=True)
    assert last["global_step"] == 5  # not 3, the last multiple of checkpoint_every_n_steps
    assert (folder / "step0000003.ckpt").exists()
    weights = dict(last["state_dict"])
    run_module.pretrain(cfg, tmp_path / "run")  # the same command again: nothing left to do
    again = torch.load(folder / "last.ckpt", weights_only=True)
    assert again["global_step"] == 5
    for key, value in weights.items():
        assert torch.equal(again["state_dict"][key], value), key


def test_a_fresh_run_sets_the_earlier_runs_results_aside(tmp_path, caplog) -> None:
    """resume=never in a folder holding a longer earlier run: this run's last.ckpt, encoder and TensorBoard
    curves are its own (Lightning would have written last-v1.ckpt beside the earlier last.ckpt, and TensorBoard
    would draw both runs' events as one curve), the earlier ones kept."""
    from safetensors.torch import load_file

    run_dir = tmp_path / "run"
    run_module.pretrain(small_config("trainer.max_steps=5", "trainer.checkpoint_every_n_steps=3"), run_dir)
    earlier = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    with caplog.at_level(logging.WARNING, logger="ssl_med.train.checkpoints"):
        run_module.pretrain(small_config("trainer.max_steps=2", "resume=never", "seed=1"), run_dir)
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["last.ckpt"], "no last-v1.ckpt, no step 3"
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 2
    encoder = load_file(run_dir / "encoder" / "model.safetensors")
    key = next(k for k in last["state_dict"] if k.startswith("objective.encoder.") and k.endswith("weight"))
    assert torch.equal(encoder[key.removeprefix("objective.encoder.")], last["state_dict"][key]), "this run's encoder"
    (aside,) = run_dir.glob("earlier-*")
    assert {p.name for p in aside.iterdir()} == {"checkpoints", "encoder", "tensorboard"}
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1, "one run's curves per TensorBoard folder"
    kept = torch.load(aside / "checkpoints" / "last.ckpt", weights_only=True)
    assert kept["global_step"] == 5 and all(torch.equal(kept["state_dict"][k], v) for k, v in earlier.items())
    assert str(aside) in caplog.text and "starts afresh" in caplog.text
    run_module.pretrain(small_config("trainer.max_steps=2"), run_dir)  # resume=auto: continues this run, moves nothing
    assert len(list(run_dir.glob("earlier-*"))) == 1


def test_a_fresh_run_sets_an_earlier_runs_curves_picture_aside(tmp_path) -> None:
    """The earlier run's training_curves.png is not left beside a fresh run (which draws its own only at the
    end): a run stopped early would show the earlier run's curves as its own."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "training_curves.png").write_bytes(b"earlier run")
    run_module.pretrain(small_config("trainer.max_steps=2", "resume=never"), run_dir)
    (aside,) = run_dir.glob("earlier-*")
    assert (aside / "training_curves.png").read_bytes() == b"earlier run"
    assert not (run_dir / "training_curves.png").is_file() or (run_dir / "training_curves.png").read_bytes() != b"earlier run"
