"""scripts/bench_representation.py: ``--jobs`` runs several (dataset, objective, seed) at once and tabulates
them in job order, the same table as one at a time."""

from __future__ import annotations

import json
import shutil
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "scripts"))
bench = pytest.importorskip("bench_representation")
ROWS = REPO / "docs" / "benchmarks" / "rows" / "breast_gm"


@pytest.mark.parametrize("jobs", [2, 3])
def test_jobs_run_at_once_and_tabulate_in_job_order(
    shared_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, jobs: int
) -> None:
    out = tmp_path / "out"
    shutil.copytree(ROWS, out)
    active, most, lock = [0], [0], threading.Lock()

    def fake_one_run(folder: Path, name: str, spec, objective: str, backbone: str, seed: int, *args) -> dict:
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        time.sleep(0.3 - 0.1 * seed)  # the later seeds finish first
        with lock:
            active[0] -= 1
        return json.loads((folder / f"{name}-{backbone}-{objective}-s{seed}" / "row.json").read_text())

    argv = ["--datasets", "breastmnist", "--objectives", "graph_matching", "--seeds", "0", "1", "2", "--steps", "300",
            "--out", str(out), "--doc", str(tmp_path / "one.md")]  # fmt: skip
    assert bench.main([*argv, "--cached-only"]) == 0  # the real, cached path, one at a time
    one_at_a_time = (tmp_path / "one.md").read_text()
    monkeypatch.setattr(bench, "one_run", fake_one_run)
    assert bench.main([*argv, "--jobs", str(jobs)]) == 0
    assert most[0] == min(jobs, 3)
    assert (tmp_path / "one.md").read_text() == one_at_a_time
    assert (out / "in_domain.md").read_text() in one_at_a_time
    assert "| breastmnist | vit-tiny/4 graph_matching | 0,1,2 |" in one_at_a_time


def test_evaluations_run_on_the_jobs_thread_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``num_threads=1`` among the overrides reaches every ``ssl_med evaluate`` of a run, not only its pretraining
    (evaluations spinning a BLAS thread per core each made --jobs 2 probes ~25x slower)."""
    from threadpoolctl import threadpool_limits

    calls: list[list[str]] = []

    def fake_one_run(out: Path, name: str, spec, *args) -> None:
        calls.append(spec.evaluate_args)

    monkeypatch.setattr(bench, "one_run", fake_one_run)
    monkeypatch.setitem(bench.BUILTIN, "breastmnist", bench.Dataset(Path(__file__), "small_2d", "breastmnist"))
    with threadpool_limits(limits=None):  # main() limits this process's BLAS threads too; restored on exit
        assert bench.main(["--datasets", "breastmnist", "--out", str(tmp_path), "num_threads=1", "data.num_workers=1"]) == 1
    assert calls == [["eval_data=breastmnist", "num_threads=1"]] * len(calls) and calls


def test_rows_record_the_encoders_input_size_beside_the_crop(tmp_path: Path) -> None:
    """VoCo's 56 px region holds four 28 px bases: the raw-pixel probe beside it reads 28 px, the encoder's
    input, not the crop."""
    from omegaconf import OmegaConf

    OmegaConf.save({"data": {"patch_size": 4, "crop_size": [56, 56]}, "backbone": {"img_size": [28, 28]}},
                   tmp_path / "resolved_config.yaml")  # fmt: skip
    row = bench.with_geometry({"dataset": "breastmnist"}, tmp_path)
    assert (row["patch_size"], row["crop_size"], row["input_size"]) == (4, 56, 28)


def test_cached_only_reads_without_writing_and_names_the_runs_budget(shared_data: Path, tmp_path: Path) -> None:
    """``--cached-only`` over a kept rows folder leaves it as it is (no ``pretrain.json`` added to rows that
    predate it, no ``in_domain.md``) and its command line names the runs' 300 steps, not the flag's default."""
    out = tmp_path / "out"
    shutil.copytree(ROWS, out)
    before = sorted(p.relative_to(out) for p in out.rglob("*"))
    argv = ["--datasets", "breastmnist", "--objectives", "graph_matching", "--seeds", "0", "1", "2",
            "--out", str(out), "--doc", str(tmp_path / "doc.md"), "--cached-only"]  # fmt: skip
    assert bench.main(argv) == 0
    assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
    assert "--seeds 0 1 2 --steps 300`" in (tmp_path / "doc.md").read_text()


RECIPE_HEADS = [
    ("finetune", "batchnorm", "random"),
    ("finetune_unnormed", "none", "random"),
    ("lpft", "batchnorm", "probe"),
    ("lpft_folded", "none", "probe"),
]


@pytest.mark.parametrize(("recipe", "head_norm", "head_init"), RECIPE_HEADS)
def test_finetune_recipes_keep_the_head_they_were_measured_with(recipe: str, head_norm: str, head_init: str) -> None:
    """A recipe key re-creates its kept rows only if a later default cannot change it: the two older recipes
    name ``eval.head_norm=none`` themselves, so ``eval=finetune``'s BatchNorm default does not reach them."""
    from ssl_med.evaluators.datasets import compose_evaluate

    cfg = compose_evaluate(bench.FINETUNE_RECIPES[recipe])
    assert (cfg.eval.head_norm, cfg.eval.head_init) == (head_norm, head_init)


def test_online_curve_keeps_one_value_per_step_the_last_written(tmp_path: Path) -> None:
    """A resumed run writes a second event file that repeats the steps after its checkpoint: the curve
    has each step once, with the resumed process's value."""
    from torch.utils.tensorboard import SummaryWriter

    for values in ({0: 0.5, 2: 0.9, 4: 0.7}, {4: 0.6, 6: 0.8}):  # killed after step 4, resumed from step 2
        writer = SummaryWriter(str(tmp_path / "tensorboard"))
        for step, value in values.items():
            writer.add_scalar("online/linear_auroc", value, step)
        writer.close()
    curve = bench.online_curve(tmp_path, "online/linear_auroc")
    assert [s for s, _ in curve] == [0, 2, 4, 6]
    assert dict(curve)[4] == pytest.approx(0.6)
    assert bench.online_curve(tmp_path, "online/knn_auroc") == []
