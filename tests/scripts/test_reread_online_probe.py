"""scripts/reread_online_probe.py on a saved run: one row per encoder (random twin, last step, val-selected),
each read at the fixed strength and at the one leave-one-out chose from the online grid."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ssl_med.config import OnlineEvalConfig
from ssl_med.export import save_encoder
from ssl_med.registry import BACKBONES

REPO = Path(__file__).resolve().parents[2]


def test_rows_for_every_encoder_of_a_run(tmp_path: Path, shared_data: Path) -> None:
    backbone = {"spatial_dims": 2, "in_chans": 1, "img_size": [28, 28], "patch_size": 7, "embed_dim": 32, "depth": 1,
                "num_heads": 2}
    run = tmp_path / "breastmnist-vit-mae-s0" / "run"
    for folder, seed in (("encoder", 1), ("encoder_best", 2)):
        torch.manual_seed(seed)
        encoder = BACKBONES.build("vit", **backbone)
        config = {"backbone": {"name": "vit", **backbone}, "objective": {"name": "mae"}, "data": {"name": "demo"}}
        save_encoder(encoder, run / folder, config, model_card=False)
    out = subprocess.run(
        [sys.executable, "scripts/reread_online_probe.py", "--out", str(tmp_path), "--dataset", "breastmnist",
         "--objective", "mae", "--seeds", "0"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
        env={**os.environ, "SSL_MED_SHARED_DATA": str(shared_data), "OMP_NUM_THREADS": "1"},
    )
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [[c.strip() for c in line.split("|")[1:-1]] for line in out.stdout.splitlines() if line.startswith("| 0 |")]
    assert [r[1] for r in rows] == ["random init", "last step", "selected on val"]
    grid = OnlineEvalConfig().ridge
    candidates = [*grid, min(grid) / 10, max(grid) * 10]  # leave-one-out may step a decade beyond an end of the grid
    for _, _, fixed, chosen in rows:
        value, strength = chosen.split()
        assert 0.0 <= float(fixed) <= 1.0 and 0.0 <= float(value) <= 1.0
        assert float(strength.strip("()")) in [pytest.approx(c) for c in candidates]
    assert len({r[2] for r in rows}) > 1  # three different encoders
