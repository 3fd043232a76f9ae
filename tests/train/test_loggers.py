"""The ``logger`` config group (Lightning's loggers, several at once), ``metrics.jsonl`` and the curves
drawn from it."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from ssl_med.config import ConfigError
from ssl_med.train import loggers as loggers_module
from ssl_med.train.loggers import (
    METRICS_FILE,
    ForwardOnlineMetrics,
    MetricsJSONL,
    build_loggers,
    local_log_dirs,
    read_metrics,
)
from tests.train.test_pretrain import config


def test_metrics_jsonl_round_trip_drops_steps_a_resume_repeats(tmp_path: Path) -> None:
    first = MetricsJSONL(tmp_path)
    for step in (1, 2, 3):
        first.log_metrics({"train/loss": 1.0 / step, "train/lr": 0.1}, step=step)
    first.log_metrics({"train/loss": float("nan")}, step=4)
    first.finalize("success")
    resumed = MetricsJSONL(tmp_path)  # restarted from the step-2 checkpoint: steps 3.. again
    resumed.log_metrics({"train/loss": 0.3}, step=3)
    resumed.log_metrics({"online/knn_auroc": 0.7}, step=3)
    resumed.finalize("success")
    with open(tmp_path / METRICS_FILE, "a") as f:
        f.write('{"step": 5, "train/lo')  # a line cut short by a kill
    series = read_metrics(tmp_path / METRICS_FILE)
    assert series["train/loss"] == [(1, 1.0), (2, 0.5), (3, 0.3)]
    assert series["train/lr"] == [(1, 0.1), (2, 0.1)]
    assert series["online/knn_auroc"] == [(3, 0.7)]
    assert read_metrics(tmp_path / "absent.jsonl") == {}


def test_steps_that_go_back_within_one_run_are_kept(tmp_path: Path) -> None:
    """The online evaluation after step 10 logs step 10 and Lightning then logs that batch's loss as step 9:
    both stay (only a restart drops what it repeats)."""
    jsonl = MetricsJSONL(tmp_path)
    for step in (10, 20):
        jsonl.log_metrics({"online/linear_auroc": step / 100}, step=step)
        jsonl.log_metrics({"train/loss": 1.0 / step}, step=step - 1)
    jsonl.finalize("success")
    series = read_metrics(tmp_path / METRICS_FILE)
    assert series["online/linear_auroc"] == [(10, 0.1), (20, 0.2)]
    assert series["train/loss"] == [(9, 0.1), (19, 0.05)]


def test_logger_group_composes_one_or_several() -> None:
    assert list(config().logger) == ["tensorboard"]
    assert sorted(config("logger=[csv,tensorboard]").logger) == ["csv", "tensorboard"]
    assert sorted(config("+logger=csv").logger) == ["csv", "tensorboard"]
    assert config("logger=[]").logger == {}
    for name in ("wandb", "mlflow"):
        assert config(f"logger={name}").logger[name]["_target_"].startswith("lightning.pytorch.loggers.")


def test_build_loggers_fills_the_run_folder_and_puts_tensorboard_first(tmp_path: Path) -> None:
    built = build_loggers(config("logger=[csv,tensorboard]").logger, tmp_path)
    assert [type(lg) for lg in built] == [TensorBoardLogger, CSVLogger, MetricsJSONL]
    assert Path(built[0].log_dir) == tmp_path / "tensorboard"
    assert Path(built[1].log_dir) == tmp_path / "csv"


def test_missing_optional_package_names_the_install(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = loggers_module.importlib.util.find_spec
    monkeypatch.setattr(loggers_module.importlib.util, "find_spec", lambda name: None if name == "wandb" else real(name))
    with pytest.raises(ConfigError, match=r"logger=wandb needs the 'wandb' package.*pip install wandb"):
        build_loggers(config("logger=wandb").logger, tmp_path)


def test_online_metrics_reach_the_loggers_tensorboard_does_not_cover(tmp_path: Path) -> None:
    class Writer:  # stands for TensorBoard's SummaryWriter, which OnlineEval writes to itself
        def add_scalar(self, *args: object) -> None: ...

    first = SimpleNamespace(experiment=Writer(), log_metrics=lambda *a, **k: pytest.fail("written twice"))
    jsonl = MetricsJSONL(tmp_path)
    online = SimpleNamespace(history=[{"step": 0, "knn_auroc": 0.5}], seconds=1.5)
    trainer = SimpleNamespace(is_global_zero=True, global_step=0, logger=first, loggers=[first, jsonl])
    forward = ForwardOnlineMetrics(online)
    forward.on_train_start(trainer, None)
    online.history.append({"step": 4, "knn_auroc": 0.75})
    forward.on_train_end(trainer, None)
    forward.on_train_end(trainer, None)  # nothing new: nothing written
    jsonl.finalize("success")
    series = read_metrics(tmp_path / METRICS_FILE)
    assert series["online/knn_auroc"] == [(0, 0.5), (4, 0.75)]
    assert series["online/seconds"] == [(0, 1.5), (4, 1.5)]


def _tiny_run(tmp_path: Path, *overrides: str) -> None:
    from ssl_med.train import run as run_module

    run_module.pretrain(config("trainer.max_steps=4", "trainer.log_every_n_steps=1", *overrides), tmp_path)


def test_pretrain_with_csv_and_tensorboard(tmp_path: Path) -> None:
    _tiny_run(tmp_path, "logger=[csv,tensorboard]")
    with open(tmp_path / "csv" / "metrics.csv") as f:
        rows = [row for row in csv.DictReader(f) if row.get("train/loss")]
    assert len(rows) == 4
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    losses = read_metrics(tmp_path / METRICS_FILE)["train/loss"]
    assert [s for s, _ in losses] == [int(r["step"]) for r in rows]
    assert [v for _, v in losses] == pytest.approx([float(r["train/loss"]) for r in rows])
    assert (tmp_path / "training_curves.png").stat().st_size > 1000


def test_pretrain_without_any_logger_still_writes_metrics_and_curves(tmp_path: Path) -> None:
    _tiny_run(tmp_path, "logger=[]")
    assert not (tmp_path / "tensorboard").exists()
    assert len(read_metrics(tmp_path / METRICS_FILE)["train/loss"]) == 4
    assert (tmp_path / "training_curves.png").stat().st_size > 1000


def test_pretrain_with_wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    _tiny_run(tmp_path, "logger=wandb", "logger.wandb.offline=true")
    assert list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(read_metrics(tmp_path / METRICS_FILE)["train/loss"]) == 4


def test_pretrain_with_mlflow_file_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store behind this switch

    uri = (tmp_path / "mlruns").as_uri()
    _tiny_run(tmp_path / "run", "logger=mlflow", f"logger.mlflow.tracking_uri={uri}")
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("ssl_med")
    (run,) = client.search_runs([experiment.experiment_id])
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 4
    assert json.loads(json.dumps(run.data.params))  # the config was logged as parameters


def test_local_log_dirs_name_the_run_folders_loggers_write_into(tmp_path: Path) -> None:
    """What a fresh run sets aside: the loggers' folders inside the run folder, not a folder elsewhere and
    not metrics.jsonl (set aside by name)."""
    run_dir = tmp_path / "run"
    elsewhere = TensorBoardLogger(save_dir=str(tmp_path / "shared"), name="tb", version="")
    config = {"tensorboard": {"_target_": "lightning.pytorch.loggers.TensorBoardLogger", "save_dir": None, "name": "tensorboard", "version": ""},
              "csv": {"_target_": "lightning.pytorch.loggers.CSVLogger", "save_dir": None, "name": "csv", "version": "v0"}}  # fmt: skip
    loggers = [*build_loggers(config, run_dir), elsewhere]
    assert sorted(local_log_dirs(loggers, run_dir)) == ["csv", "tensorboard"]
