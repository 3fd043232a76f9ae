"""``ssl_med evaluate`` and ``ssl_med report`` end to end on tiny configs, plus the Python API."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from ssl_med.cli import main
from ssl_med.evaluators.api import evaluate, random_init_like, resolve_encoder_dir
from ssl_med.evaluators.report import collect, markdown_table

from .conftest import seg_cfg, tiny_vit


@pytest.fixture
def encoder_run(tmp_path: Path) -> Path:
    """A run folder with ``encoder/`` exported like ``ssl_med pretrain`` does."""
    from ssl_med.export import save_encoder

    backbone = {
        "name": "vit",
        "spatial_dims": 2,
        "in_chans": 1,
        "img_size": 32,
        "patch_size": 8,
        "embed_dim": 32,
        "depth": 2,
        "num_heads": 2,
    }
    save_encoder(
        tiny_vit(seed=5), tmp_path / "run" / "encoder", {"backbone": backbone, "objective": {"name": "mae"}}
    )
    return tmp_path / "run"


def test_evaluate_cli_knn_and_probe_then_report(encoder_run: Path, shared_data: Path, tmp_path: Path) -> None:
    common = [
        f"checkpoint={encoder_run}",
        "eval_data=breastmnist",
        f"eval_data.path={shared_data}/medmnist/breastmnist.npz",
        "eval_data.subset=40",
        "eval_data.image_size=32",
        f"cache_dir={tmp_path / 'cache'}",
    ]
    sweep = tmp_path / "sweep"
    assert main(["evaluate", "eval=knn", *common, f"hydra.run.dir={sweep}/knn"]) == 0
    probe = ["eval=linear_probe", "eval.C=[0.01,1.0]", "eval.label_fractions=[0.1,1.0]", "eval.seeds=[0,1]"]
    assert main(["evaluate", *probe, *common, f"hydra.run.dir={sweep}/probe"]) == 0

    results = json.loads((sweep / "probe" / "results.json").read_text())
    assert [r["encoder"] for r in results["rows"]] == ["pretrained", "random-init"]
    assert results["encoder"]["backbone"]["name"] == "vit" and "ResNet-18 (28)" in results["published"]
    assert set(results["rows"][0]["details"]["label_efficiency"]) == {"0.1", "1.0"}
    md = (sweep / "probe" / "results.md").read_text()
    assert "random-init" in md and "published" in md and "Label efficiency" in md
    assert (sweep / "probe" / "label_efficiency_accuracy.png").stat().st_size > 0
    assert list((sweep / "probe" / "tensorboard").glob("events.out.tfevents.*"))
    # pretrained + random-init x the probe's 3 read-outs (mean_patch, shared with knn; pooled; pooled+mean_patch)
    assert len(list((tmp_path / "cache").rglob("*.npz"))) == 6
    assert {r["details"]["features"] for r in results["rows"]} <= {"mean_patch", "pooled", "pooled+mean_patch"}

    assert main(["report", str(sweep)]) == 0
    summary = (sweep / "summary.md").read_text()
    assert summary.count("random-init") == 2 and "knn" in summary and "linear_probe" in summary
    assert (sweep / "summary_knn_accuracy.png").is_file()
    assert main(["report", str(tmp_path / "nothing")]) == 1


def test_evaluate_cli_lpft_preset_fine_tunes_from_the_probe_and_plots_the_val_curves(
    encoder_run: Path, shared_data: Path, tmp_path: Path
) -> None:
    out = tmp_path / "lpft"
    assert main([
        "evaluate", "eval=lpft", f"checkpoint={encoder_run}", "eval_data=breastmnist",
        f"eval_data.path={shared_data}/medmnist/breastmnist.npz", "eval_data.subset=40", "eval_data.image_size=32",
        "eval.steps=4", "eval.eval_every=2", "eval.lr=[1e-4]", f"hydra.run.dir={out}",
    ]) == 0
    results = json.loads((out / "results.json").read_text())
    for row in results["rows"]:
        assert results["config"]["eval"]["head_norm"] == "batchnorm" and results["config"]["eval"]["head_lr"] is None
        history = row["details"]["grid"][0]["history"]
        assert [h["step"] for h in history] == [0, 2, 4]  # the probe, then two checks
        assert row["details"]["features"] in ("pooled", "mean_patch", "pooled+mean_patch")
    assert (out / "finetune_val_auroc.png").stat().st_size > 0


def test_evaluate_api_segmentation_on_kvasir(encoder_run: Path, kvasir_cfg: dict, tmp_path: Path) -> None:
    encoder_dir = resolve_encoder_dir(encoder_run)
    baseline = random_init_like(encoder_dir, seed=0)
    cfg = seg_cfg(mode="finetune", steps=2, eval_every=2)
    results = evaluate(tiny_vit(seed=5), cfg, kvasir_cfg, tmp_path / "seg", baseline=baseline)
    rows = {r["encoder"]: r for r in results["rows"]}
    assert set(rows) == {"pretrained", "random-init"}
    assert 0 <= rows["pretrained"]["metrics"]["dice_mean"] <= 1
    curve = rows["pretrained"]["details"]["interpolation"]
    assert [p["alpha"] for p in curve] == [0.0, 1.0]
    assert np.isclose(curve[-1]["dice_mean"], rows["pretrained"]["metrics"]["dice_mean"], equal_nan=True)
    assert list((tmp_path / "seg" / "overlays").glob("*.png"))
    flat = collect(tmp_path)
    assert {r["encoder"] for r in flat} == {"pretrained", "random-init"}
    assert "dice_mean" in markdown_table(flat, ["encoder", "dice_mean"])


def test_evaluate_rejects_dimension_mismatch(kvasir_cfg: dict, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="3D"):
        evaluate(tiny_vit(3, 16), seg_cfg(), kvasir_cfg, tmp_path)
