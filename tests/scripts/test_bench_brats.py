"""scripts/bench_brats.py: subsets evaluated in separate runs merge into one table row per subset."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
bench_brats = pytest.importorskip("bench_brats")


def write_results(folder: Path, metrics: dict[str, dict[str, float]]) -> None:
    folder.mkdir(parents=True)
    rows = [{"encoder": encoder, "metrics": values} for encoder, values in metrics.items()]
    (folder / "results.json").write_text(json.dumps({"rows": rows}))


def test_table_merges_evaluations_and_reports_gap_per_seed(tmp_path: Path) -> None:
    for seed, (pre, rnd) in enumerate([(0.30, 0.25), (0.20, 0.25)]):
        write_results(tmp_path / f"brats-s{seed}" / "seg-mae",
                      {"pretrained": {"t1+t1ce+t2+flair/dice_mean": pre, "flair/dice_mean": 0.05},
                       "random-init": {"t1+t1ce+t2+flair/dice_mean": rnd, "flair/dice_mean": 0.04}})
    # a later evaluation of one more subset, seed 0 only; BM-MAE's folder must not leak into MAE's rows
    write_results(tmp_path / "brats-s0" / "seg-mae-1",
                  {"pretrained": {"t1ce/dice_mean": 0.11}, "random-init": {"t1ce/dice_mean": 0.10}})
    write_results(tmp_path / "brats-s0" / "seg-bm_mae",
                  {"pretrained": {"t1ce/dice_mean": 0.9}, "random-init": {"t1ce/dice_mean": 0.1}})
    assert bench_brats.dice_by_subset(tmp_path / "brats-s0", "mae")["t1ce"] == {"pretrained": 0.11, "random-init": 0.10}
    rows = bench_brats.table(tmp_path, [0, 1], [["t1", "t1ce", "t2", "flair"], ["t1ce"]]).splitlines()[2:]
    assert rows[0].startswith("| MAE (4-channel ViT) | all four | 0,1 | 0.250 ± 0.071 | 0.250 ± 0.000 |")
    assert "+0.050, -0.050" in rows[0]
    assert rows[1].startswith("| MAE (4-channel ViT) | t1ce | 0 | 0.110 | 0.100 | **0.010** | +0.010 |")
    assert rows[2].startswith("| BM-MAE (per-modality ViT) | t1ce | 0 | 0.900")
    assert len(rows) == 3


def test_pretrain_overrides_come_last_so_they_win(tmp_path: Path) -> None:
    plain = bench_brats.pretrain_command(tmp_path / "s.zarr", "hi_end_mae", 0, 300, tmp_path / "run")
    given = bench_brats.pretrain_command(tmp_path / "s.zarr", "hi_end_mae", 0, 300, tmp_path / "run",
                                         ["data.batch_size=32", "optim.lr=1.5e-3"])  # fmt: skip
    assert "data.batch_size=8" in plain and given[: len(plain)] == plain
    assert given[len(plain):] == ["data.batch_size=32", "optim.lr=1.5e-3"]


def test_num_threads_reaches_the_evaluation_too(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    commands: list[list[str]] = []
    monkeypatch.setattr(bench_brats, "run", lambda cmd, log: commands.append(cmd) or 1.0)
    bench_brats.one_seed(tmp_path, tmp_path / "s.zarr", "mae", 0, 300, [["flair"]], ["optim.lr=1e-3", "num_threads=1"])
    pretrain, evaluate = commands
    assert pretrain[-2:] == ["optim.lr=1e-3", "num_threads=1"]
    assert evaluate[:3] == ["ssl_med", "evaluate", "eval=segmentation"] and evaluate[-1] == "num_threads=1"
    assert "optim.lr=1e-3" not in evaluate


@pytest.mark.parametrize("objective", sorted(bench_brats.OBJECTIVES))
def test_every_objective_pretrains_the_same_32_cubed_encoder(tmp_path: Path, objective: str) -> None:
    """The table compares objectives through one decoder, so every row's encoder takes 32^3 inputs of
    the four sequences (VoCo's 32x64x64 region is cut into four such bases)."""
    from hydra import compose, initialize_config_module

    from ssl_med.train.geometry import prepare_pretrain_config

    command = bench_brats.pretrain_command(tmp_path / "s.zarr", objective, 0, 300, tmp_path / "run")
    overrides = [arg for arg in command[2:] if not arg.startswith("hydra.")]
    with initialize_config_module(config_module="ssl_med.conf", version_base="1.3"):
        cfg = prepare_pretrain_config(compose(config_name="pretrain", overrides=overrides), overrides)
    assert list(cfg.backbone["img_size"]) == [32, 32, 32]
    assert cfg.data.num_channels == 4 and list(cfg.data.channels) == list(bench_brats.SEQUENCES)


@pytest.mark.parametrize(
    ("objective", "key", "value"),
    [
        ("mae", "objective.norm_pix_loss", False),
        ("hi_end_mae", "data.batch_size", 32),
        ("hi_end_mae", "optim.lr", 1.5e-3),
        ("graph_matching", "data.batch_size", 32),
        ("graph_matching", "optim.lr", 3e-4),
    ],
)
def test_one_command_recreates_the_tables_settings(tmp_path: Path, objective: str, key: str, value: object) -> None:
    """The BraTS table's MAE reconstructs raw intensities, its Hi-End-MAE runs at VesselMNIST3D's batch
    and learning rate and its graph matching at recipe=small_3d's: the script's defaults, so the documented
    command re-creates the table."""
    from hydra import compose, initialize_config_module
    from omegaconf import OmegaConf

    command = bench_brats.pretrain_command(tmp_path / "s.zarr", objective, 0, 300, tmp_path / "run")
    overrides = [arg for arg in command[2:] if not arg.startswith("hydra.")]
    with initialize_config_module(config_module="ssl_med.conf", version_base="1.3"):
        cfg = compose(config_name="pretrain", overrides=overrides)
    assert OmegaConf.select(cfg, key) == value


def test_fine_tuned_evaluations_are_their_own_rows_and_ask_for_the_mode(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``--modes finetune`` evaluates with ``eval.mode=finetune`` into its own folders, and the table keeps
    fine-tuned and frozen rows of the same objective apart."""
    all_four = "t1+t1ce+t2+flair/dice_mean"
    write_results(tmp_path / "brats-s0" / "seg-mae-0", {"pretrained": {all_four: 0.30}, "random-init": {all_four: 0.25}})
    write_results(tmp_path / "brats-s0" / "segft-mae-0", {"pretrained": {all_four: 0.40}, "random-init": {all_four: 0.42}})
    assert bench_brats.dice_by_subset(tmp_path / "brats-s0", "mae", "finetune")["t1+t1ce+t2+flair"]["pretrained"] == 0.40
    rows = bench_brats.table(tmp_path, [0], [["t1", "t1ce", "t2", "flair"]]).splitlines()[2:]
    assert rows == [
        "| MAE (4-channel ViT) | all four | 0 | 0.300 | 0.250 | **0.050** | +0.050 |",
        "| MAE (4-channel ViT), fine-tuned with the decoder | all four | 0 | 0.400 | 0.420 | **-0.020** | -0.020 |",
    ]
    commands: list[list[str]] = []
    monkeypatch.setattr(bench_brats, "run", lambda cmd, log: commands.append(cmd) or 1.0)
    (tmp_path / "brats-s1" / "mae" / "encoder").mkdir(parents=True)
    (tmp_path / "brats-s1" / "mae" / "encoder" / "config.json").write_text("{}")  # pretrained: only evaluations run
    for mode in ("frozen", "finetune"):
        bench_brats.one_seed(tmp_path, tmp_path / "s.zarr", "mae", 1, 300, [["flair"]], (), mode)
    frozen, finetune = commands
    assert "eval.mode=frozen" in frozen and any(a.endswith("brats-s1/seg-mae-0") for a in frozen)
    assert "eval.mode=finetune" in finetune and any(a.endswith("brats-s1/segft-mae-0") for a in finetune)
