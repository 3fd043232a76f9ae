"""Real multi-process training on the CPU (DDP over gloo) through the CLI, single runs and sweeps."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

TINY = [
    "backbone.embed_dim=48",
    "backbone.depth=2",
    "objective.decoder_dim=32",
    "objective.decoder_depth=1",
    "objective.decoder_heads=2",
    "data.crop_size=[32,32]",
    "data.num_workers=0",
    "data.samples_per_epoch=64",
    "trainer.progress_bar=false",
    "trainer.max_steps=4",
    "optim.warmup_steps=1",
]
DDP = ["trainer=ddp", "trainer.accelerator=cpu", "trainer.devices=2"]


def ssl_med(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        [sys.executable, "-m", "ssl_med", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def test_ddp_two_processes_match_one_process_on_the_same_global_batch(tmp_path: Path) -> None:
    ssl_med("pretrain", *TINY, *DDP, "data.batch_size=4", f"hydra.run.dir={tmp_path / 'ddp'}", cwd=tmp_path)
    ssl_med("pretrain", *TINY, "data.batch_size=8", f"hydra.run.dir={tmp_path / 'single'}", cwd=tmp_path)
    checksums = json.loads((tmp_path / "ddp" / "encoder" / "rank_checksums.json").read_text())
    assert len(checksums) == 2 and checksums[0] == checksums[1]  # ranks agree on the weights
    ddp = load_file(tmp_path / "ddp" / "encoder" / "model.safetensors")
    single = load_file(tmp_path / "single" / "encoder" / "model.safetensors")
    for name, value in single.items():
        torch.testing.assert_close(ddp[name], value, atol=2e-4, rtol=1e-3)
    assert (tmp_path / "ddp" / "checkpoints" / "last.ckpt").is_file()
    assert torch.load(tmp_path / "ddp" / "checkpoints" / "last.ckpt", weights_only=False)["global_step"] == 4


@pytest.mark.slow
def test_multirun_with_ddp_makes_one_folder_per_point(tmp_path: Path) -> None:
    sweep = tmp_path / "sweep"
    ssl_med("pretrain", "-m", *TINY, *DDP, "data.batch_size=4", "optim.lr=1e-3,2e-3", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    runs = sorted(p.name for p in sweep.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert runs == ["0_vit-mae-demo", "1_vit-mae-demo"], runs
    for run in runs:
        assert (sweep / run / "encoder" / "model.safetensors").is_file()
        assert (sweep / run / ".hydra" / "overrides.yaml").is_file()
    assert not (tmp_path / "outputs").exists()  # children did not start runs of their own
    assert not (tmp_path / "multirun").exists()
