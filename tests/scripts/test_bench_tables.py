"""scripts/bench_tables.py's label-efficiency table: per seed the mean over its draws, gap per seed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
bench = pytest.importorskip("bench_tables")


def _row(seed: int, pretrained: float, random_init: float) -> dict:
    curve = lambda auroc: {"0.01": {"auroc": [auroc, 0.05, 3], "accuracy": [0.7, 0.0, 3]}}  # noqa: E731
    return {
        "dataset": "breastmnist", "backbone": "vit", "objective": "mae", "patch_size": 4, "steps": 300, "seed": seed,
        "label_efficiency/pretrained": curve(pretrained), "label_efficiency/random-init": curve(random_init),
        "label_efficiency_features/pretrained": {"0.01": ["mean_patch"] * 3},
        "label_efficiency_features/random-init": {"0.01": ["pooled", "mean_patch", "pooled"]},
    }


def test_label_efficiency_table_reports_seed_means_and_gaps() -> None:
    rows = [_row(0, 0.80, 0.70), _row(1, 0.90, 0.70), {"dataset": "breastmnist", "seed": 2}]  # seed 2: not probed
    assert bench.has_fractions(rows[0], [0.01]) and not bench.has_fractions(rows[0], [0.01, 0.1])
    pixels = [{"dataset": "breastmnist", "label_efficiency": {"0.01": {"auroc": [0.6, 0.02, 3]}}}]
    lines = bench.label_efficiency_table(rows, [0.01], pixels).splitlines()
    assert len(lines) == 3
    cells = [c.strip() for c in lines[2].split("|")[1:-1]]
    assert cells[:4] == ["breastmnist", "vit-tiny/4 mae, 300 steps", "0,1", "1 %"]
    assert cells[4] == "0.850 ± 0.071" and cells[5] == "0.700 ± 0.000"
    assert cells[6] == "**0.150 ± 0.071**" and cells[7] == "+0.100, +0.200"
    assert cells[8] == "0.600 ± 0.020"
    assert cells[9] == "mp,mp,mp mp,mp,mp; cls,mp,cls cls,mp,cls"
    assert bench.label_efficiency_table(rows[2:], [0.01]) == ""


def test_rows_given_extra_overrides_are_their_own_group_and_say_so() -> None:
    """Runs given a setting beyond the recipe (raw-voxel MAE targets) are not averaged with the recipe's runs,
    and their label names the setting; thread and worker counts and the online curve's settings split nothing."""
    run = "ssl_med pretrain recipe=small_3d objective=mae seed={s} hydra.run.dir=/x/run{extra} num_threads=1 data.num_workers=1 online_eval.every_n_steps=100"
    rows = [{**_row(s, 0.8, 0.7), "command": run.format(s=s, extra=extra)}
            for s in (0, 1) for extra in ("", " objective.norm_pix_loss=false")]  # fmt: skip
    assert bench.variant(rows[0]) == "" and bench.variant(rows[1]) == "objective.norm_pix_loss=false"
    assert bench.variant({"dataset": "breastmnist"}) == ""
    lines = bench.label_efficiency_table(rows, [0.01]).splitlines()[2:]
    assert [line.split("|")[2].strip() for line in lines] == [
        "vit-tiny/4 mae, 300 steps", "vit-tiny/4 mae, objective.norm_pix_loss=false, 300 steps"]  # fmt: skip
    assert all("| 0,1 |" in line for line in lines)


def test_label_efficiency_plot_is_written(tmp_path: Path) -> None:
    rows = [{**_row(s, 0.8, 0.7), "linear_probe/pretrained": {"auroc": 0.85}, "linear_probe/random-init": {"auroc": 0.83}}
            for s in (0, 1)]
    pixels = [{"dataset": "breastmnist", "auroc": 0.79, "label_efficiency": {"0.01": {"auroc": [0.6, 0.02, 3]}}}]
    bench.plot_label_efficiency(rows, [0.01], pixels, tmp_path / "le.png")
    assert (tmp_path / "le.png").stat().st_size > 10_000
    bench.plot_label_efficiency(rows, [0.1], pixels, tmp_path / "none.png")  # no row has 10 %: nothing to draw
    assert not (tmp_path / "none.png").exists()


def test_main_tabulates_rows_of_several_folders(tmp_path: Path) -> None:
    for folder, seed in (("budget-a", 0), ("budget-b", 1)):
        row = {**_row(seed, 0.8, 0.7), "linear_probe/pretrained": {"auroc": 0.85}, "linear_probe/random-init": {"auroc": 0.83}}
        (tmp_path / folder / f"run-s{seed}").mkdir(parents=True)
        (tmp_path / folder / f"run-s{seed}" / "row.json").write_text(json.dumps(row))
    (tmp_path / "budget-a" / "other" ).mkdir()
    (tmp_path / "budget-a" / "other" / "row.json").write_text(json.dumps({"dataset": "breastmnist", "seed": 5}))
    pixels = {"dataset": "breastmnist", "auroc": 0.79, "label_efficiency": {"0.01": {"auroc": [0.6, 0.02, 3]}}}
    (tmp_path / "budget-a" / "pixels-breastmnist-28-cv.json").write_text(json.dumps(pixels))
    doc = tmp_path / "results.md"
    doc.write_text(f"intro\n{bench.LE_BEGIN}\nstale table\n{bench.LE_END}\nafter\n")
    assert bench.main([str(tmp_path / "budget-a"), str(tmp_path / "budget-b"), "--fractions", "0.01", "--doc", str(doc)]) == 0
    text = doc.read_text()
    assert text.startswith("intro\n") and text.endswith("after\n") and "stale table" not in text
    assert "| 0,1 | 1 % | 0.800 ± 0.000 | 0.700 ± 0.000 | **0.100 ± 0.000** |" in text and "0.600 ± 0.020" in text
    assert (tmp_path / "benchmarks" / "label_efficiency.png").is_file()


def test_finetune_table_reports_the_gap_and_what_val_chose() -> None:
    def row(seed: int, pretrained: float, random_init: float) -> dict:
        chosen = {"features": "pooled+mean_patch", "lr": 1e-4, "layer_decay": 0.75, "val_score": 0.9, "step": 0}
        return {
            "dataset": "breastmnist", "backbone": "vit", "objective": "graph_matching", "patch_size": 4, "seed": seed,
            "lpft/pretrained": {"auroc": pretrained, "balanced_accuracy": 0.7}, "lpft/random-init": {"auroc": random_init, "balanced_accuracy": 0.5},
            "lpft_choice/pretrained": chosen, "lpft_choice/random-init": {**chosen, "features": "pooled", "step": 200},
        }

    rows = [row(0, 0.86, 0.83), row(1, 0.84, 0.83)]
    lines = bench.finetune_table(rows, "lpft").splitlines()
    cells = [c.strip() for c in lines[2].split("|")[1:-1]]
    assert cells[:6] == ["breastmnist", "vit-tiny/4 graph_matching", "0,1", "0.850 ± 0.014", "0.830 ± 0.000", "**0.020 ± 0.014**"]
    assert cells[6] == "0.70, 0.70; 0.50, 0.50"  # 0.5: a one-class classifier, named beside its AUROC
    assert cells[7] == "cls+mp/0.0001/0.75@0, cls+mp/0.0001/0.75@0; cls/0.0001/0.75@200, cls/0.0001/0.75@200"
    assert bench.finetune_table(rows) == ""  # no random-head fine-tune in these rows
