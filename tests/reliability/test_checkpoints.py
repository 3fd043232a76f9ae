"""Resume never unpickles code, even with ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1``."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module

from ssl_med.config import PretrainConfig, parse_pretrain_config
from ssl_med.train import run as run_module
from ssl_med.train.callbacks import AtomicCheckpointIO

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
