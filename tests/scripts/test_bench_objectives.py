"""scripts/bench_objectives.py: ``--size default`` composes the design-card pairs at default sizes."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
bench_objectives = pytest.importorskip("bench_objectives")


def test_default_size_composes_the_design_card_command() -> None:
    assert bench_objectives.design_card_overrides("voco", "mamba") == ["backbone=mamba", "objective=voco"]
    cfg = bench_objectives.compose_config("voco", "mamba", "default")
    # the objective's own data (conf/objective/voco.yaml) and batch; img_size fitted to VoCo's base crops
    assert (cfg.data.name, list(cfg.data.crop_size), cfg.data.batch_size) == ("demo3d_voco", [32, 96, 96], 4)
    assert list(cfg.backbone["img_size"]) == [32, 32, 32]
    # no width/depth overrides: the backbone's default size class
    assert (cfg.backbone["size"], cfg.backbone["embed_dim"], cfg.backbone["depth"]) == ("tiny", None, None)
    assert cfg.objective["proj_dim"] == 256
    assert bench_objectives.input_label(cfg) == "demo3d_voco 32x96x96"


def test_tiny_size_keeps_the_tiny_overrides() -> None:
    _, data, batch = bench_objectives.DATA["voco"][0]
    cfg = bench_objectives.compose_config("voco", "mamba", "tiny", data, batch)
    assert (cfg.backbone["embed_dim"], cfg.backbone["depth"], cfg.data.batch_size) == (48, 2, batch)
    assert cfg.objective["proj_dim"] == 64
    with pytest.raises(ValueError):
        bench_objectives.compose_config("voco", "mamba", "default", data, batch)


@pytest.mark.parametrize("size", ["tiny", "default"])
def test_overrides_reach_the_config_at_both_sizes(size: str) -> None:
    data, batch = (["data=demo", "data.crop_size=[32,32]"], 16) if size == "tiny" else (None, None)
    plain = bench_objectives.compose_config("dino", "mamba", size, data, batch)
    checkpointed = bench_objectives.compose_config(
        "dino", "mamba", size, data, batch, ["trainer.activation_checkpointing=true"]
    )
    assert (plain.trainer.activation_checkpointing, checkpointed.trainer.activation_checkpointing) == (False, True)
    assert checkpointed.backbone == plain.backbone


def test_default_report_has_ratios_to_vit_and_goals(tmp_path: Path) -> None:
    def row(backbone: str, step_s: float, peak: float) -> tuple:
        r = dict(samples_per_s=4 / step_s, step_s=step_s, peak_mib=peak, base_mib=900.0, batch=4,
                 input="demo 64x64", solver_share=None, params_m=5.0)  # fmt: skip
        return ("mae", backbone, "demo 64x64", 4, r)

    args = argparse.Namespace(size="default", steps=3, threads=1, out=tmp_path / "r.md", overrides=[])
    bench_objectives.write_report(args, [row("vit", 1.0, 1000.0), row("mamba", 2.5, 1400.0), row("xlstm", 1.5, 1600.0)])
    text = args.out.read_text()
    assert "| mae | mamba | demo 64x64 | 4 | 1.6 | 2.500 | 2.50x | 1400 | 1.40x | 500 | 5.0 | - |" in text
    assert "- mae / mamba: step 2.50x ViT (<= 2x: **not met**); peak memory 1.40x ViT (<= 1.5x: met)" in text
    assert "- mae / xlstm: step 1.50x ViT (<= 2x: met); peak memory 1.60x ViT (<= 1.5x: **not met**)" in text
    assert "shared with other CPU benchmark jobs" in text
