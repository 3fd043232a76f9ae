"""Schedules given as fractions of the run, the wall-time budget, and the collapse warning."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from ssl_med.registry import BACKBONES, OBJECTIVES
from ssl_med.train.collapse import CollapseMonitor
from ssl_med.train.schedules import steps_of


def test_steps_of_reads_steps_and_fractions() -> None:
    assert steps_of(20, 300) == 20
    assert steps_of(0.1, 300) == 30
    assert steps_of(0.3, 100) == 30 and steps_of(0.3, 1000) == 300
    assert steps_of(0, 300) == 0
    with pytest.raises(ValueError, match=">= 0"):
        steps_of(-1, 10)


def test_dino_warmups_scale_with_the_run() -> None:
    encoder = BACKBONES.build("vit", spatial_dims=2, img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2)
    dino = OBJECTIVES.build(
        "dino", encoder=encoder, out_dim=16, hidden_dim=16, bottleneck_dim=8, views={"n_local_crops": 1},
        warmup_teacher_temp_steps=0.3, warmup_teacher_temp=0.04, teacher_temp=0.07, freeze_last_layer_steps=0.01,
    )
    for total in (100, 1000):
        dino.set_run_length(total)
        dino.step.fill_(int(0.3 * total) - 1)  # the last warm-up step
        assert dino.current_teacher_temp() == pytest.approx(0.07, abs=0.04 / total * 5)
        dino.step.fill_(int(0.15 * total))
        assert 0.05 < dino.current_teacher_temp() < 0.06, "half-way through the warm-up at any run length"


def test_collapse_monitor_warns_once(caplog: pytest.LogCaptureFixture) -> None:
    monitor = CollapseMonitor(ratio=0.1, patience=3)
    with caplog.at_level(logging.WARNING, logger="ssl_med.train.module"):
        assert not any(monitor.update(0.07, 0.072, s) for s in range(10))  # healthy
        fired = [monitor.update(0.001, 0.072, s) for s in range(10, 20)]
    assert fired.count(True) == 1 and fired.index(True) == 2
    assert "embedding collapse at step 12" in caplog.text


def test_max_time_stops_a_run_early(tmp_path: Path) -> None:
    from ssl_med.train import run as run_module
    from tests.train.test_pretrain import config

    cfg = config("trainer.max_steps=100000", "trainer.max_time=00:00:00:03")
    export_dir = run_module.pretrain(cfg, tmp_path)
    assert (export_dir / "model.safetensors").is_file(), "a run stopped by its budget still exports"
