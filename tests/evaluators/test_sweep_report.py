"""Sweep summaries: a column per swept key from ``.hydra/overrides.yaml``, rows sorted by the chosen
metric, and metric vs the swept value when one swept key is numeric (fake run folders, no training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from ssl_med.cli import main
from ssl_med.evaluators.report import write_summary
from ssl_med.evaluators.sweep import parse_overrides, run_overrides, swept_keys


def fake_run(run_dir: Path, overrides: list[str], accuracy: float, online_auroc: float | None = None) -> None:
    """A pretraining run folder as a multirun job leaves it: Hydra's overrides, a kNN result and
    (optionally) an online evaluation curve."""
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    results = {
        "eval": "knn", "data": "breastmnist", "encoder": {"backbone": {"name": "vit"}, "objective": {"name": "mae"}},
        "rows": [
            {"encoder": "pretrained", "metrics": {"accuracy": accuracy, "auroc": 1 - accuracy}, "details": {}},
            {"encoder": "random-init", "metrics": {"accuracy": 0.5, "auroc": 0.5}, "details": {}},
        ],
    }  # fmt: skip
    (run_dir / "eval" / "knn-breastmnist").mkdir(parents=True)
    (run_dir / "eval" / "knn-breastmnist" / "results.json").write_text(json.dumps(results))
    if online_auroc is not None:
        point = {"knn_accuracy": 0.6, "knn_auroc": 0.6}
        history = [{"step": 0, **point, "linear_auroc": 0.5}, {"step": 10, **point, "linear_auroc": online_auroc}]
        (run_dir / "online_eval.json").write_text(json.dumps({"data": "breastmnist", "history": history}))


def table(markdown: str) -> list[list[str]]:
    """The cells of the first markdown table in ``markdown``."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    end = next((i for i, line in enumerate(lines[2:], 2) if line.startswith("| run")), len(lines))
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[:end] if not line.startswith("|---")]


def test_parse_overrides_keeps_numbers_and_text() -> None:
    parsed = parse_overrides(["optim.lr=3e-4", "+logger=csv", "data.crop_size=[32,32]", "~seed", "backbone=vit"])
    assert parsed == {"optim.lr": 3e-4, "logger": "csv", "data.crop_size": "[32,32]", "backbone": "vit"}
    assert swept_keys([{"a": 1, "b": "x"}, {"a": 2, "b": "x"}, {"b": "x", "c": 0}]) == ["a", "c"]


def test_overrides_merge_from_the_root_down(tmp_path: Path) -> None:
    fake_run(tmp_path / "0_run", ["optim.lr=0.001", "seed=1"], 0.7)
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "overrides.yaml").write_text("- seed=0\n- data=demo3d\n")
    found = run_overrides(tmp_path / "0_run" / "eval" / "knn-breastmnist" / "results.json", tmp_path)
    assert found == {"seed": 1, "data": "demo3d", "optim.lr": 0.001}


def test_summary_has_a_column_per_swept_key_sorted_by_metric_and_a_plot(tmp_path: Path) -> None:
    for i, (lr, acc, online) in enumerate([(1e-4, 0.70, 0.72), (3e-4, 0.80, 0.65), (1e-3, 0.60, 0.81)]):
        fake_run(tmp_path / f"{i}_vit-mae-demo", [f"optim.lr={lr}", "data=demo", "trainer.max_steps=10"], acc, online)
    summary = write_summary(tmp_path).read_text()
    rows = table(summary)
    assert rows[0][:2] == ["run", "optim.lr"], "the swept key; not data or max_steps, which every run shares"
    assert "trainer.max_steps" not in summary
    pretrained = [r for r in rows[1:] if "pretrained" in r]
    assert [r[1] for r in pretrained] == ["0.0003", "0.0001", "0.001"], "highest accuracy (knn's headline) first"
    online = summary.split("## Online evaluation")[1]
    assert "sorted by linear_auroc" in online and online.index("| 0.001 |") < online.index("| 0.0001 |")
    assert (tmp_path / "summary_sweep_optim.lr.png").stat().st_size > 1000

    assert main(["report", str(tmp_path), str(tmp_path / "by_auroc"), "--metric", "auroc"]) == 0
    by_auroc = [r for r in table((tmp_path / "by_auroc" / "summary.md").read_text())[1:] if "pretrained" in r]
    assert [r[1] for r in by_auroc] == ["0.001", "0.0001", "0.0003"]


def test_no_plot_without_exactly_one_numeric_key_and_colliding_names(tmp_path: Path) -> None:
    for i, (data, lr) in enumerate([("demo", 1e-4), ("demo3d", 3e-4)]):
        fake_run(tmp_path / f"{i}_run", [f"data={data}", f"optim.lr={lr}", f"objective.mask_ratio={0.6 + i / 10}"], 0.7 + i / 10)
    rows = table(write_summary(tmp_path).read_text())
    assert rows[0][:4] == ["run", "data (override)", "optim.lr", "objective.mask_ratio"]
    assert "breastmnist" in rows[1], "the evaluation's data column stays"
    assert not list(tmp_path.glob("summary_sweep_*.png")), "two numeric keys: no single x axis"


def test_run_folders_are_not_columns_and_columns_chooses_keys(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    for i, (lr, seed) in enumerate([(1e-4, 0), (3e-4, 1)]):
        overrides = [f"optim.lr={lr}", f"seed={seed}", f"hydra.run.dir=/runs/{i}", f"experiment=run{i}"]
        fake_run(tmp_path / f"{i}_run", overrides, 0.7 + i / 10)
    assert table(write_summary(tmp_path).read_text())[0][:3] == ["run", "optim.lr", "seed"], "no hydra.* or experiment"
    assert main(["report", str(tmp_path), str(tmp_path / "seed_only"), "--columns", "seed,"]) == 0
    assert table((tmp_path / "seed_only" / "summary.md").read_text())[0][:3] == ["run", "seed", "eval"]
    assert main(["report", str(tmp_path), str(tmp_path / "chosen"), "--columns", "seed,optim.lr,optim.lrr"]) == 0
    assert table((tmp_path / "chosen" / "summary.md").read_text())[0][:4] == ["run", "seed", "optim.lr", "eval"], "in the order asked"
    assert "no column of its own for 'optim.lrr'" in caplog.text, "a misspelt key is reported, not dropped silently"
    with pytest.raises(SystemExit):
        main(["report", str(tmp_path), "--columns"])
