"""Experiment loggers: Lightning's own, chosen by the ``logger`` config group, plus ``metrics.jsonl``.

``conf/logger/<name>.yaml`` holds one entry ``<name>: {_target_: <Lightning logger class>, ...}``;
Hydra merges every chosen file into ``cfg.logger``, so several loggers run at once::

    ssl_med pretrain                               TensorBoard (the default)
    ssl_med pretrain logger=csv                    CSV only
    ssl_med pretrain logger=[tensorboard,wandb]    both
    ssl_med pretrain +logger=mlflow                the default plus MLflow
    ssl_med pretrain logger=[]                     no logger (metrics.jsonl is still written)

Whatever is chosen, :class:`MetricsJSONL` writes every logged scalar to ``<run dir>/metrics.jsonl``
(one JSON object per logging call: ``{"step": ..., "<name>": value, ...}``), which the
``training_curves.png`` plot reads, so the picture needs no particular logger.
"""

from __future__ import annotations

import importlib.util
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only

from ssl_med.config import ConfigError

METRICS_FILE = "metrics.jsonl"
#: the line :class:`MetricsJSONL` writes before a process's first record (a start or a resume)
START_RECORD = {"start": True}

#: the package each Lightning logger imports, and how to install it when it is missing
OPTIONAL_PACKAGES: dict[str, tuple[str, str]] = {
    "TensorBoardLogger": ("tensorboard", "pip install tensorboard"),
    "WandbLogger": ("wandb", "pip install wandb  (or pip install 'ssl_med[wandb]')"),
    "MLFlowLogger": ("mlflow", "pip install mlflow  (or pip install 'ssl_med[mlflow]')"),
    "CometLogger": ("comet_ml", "pip install comet-ml"),
    "NeptuneLogger": ("neptune", "pip install neptune"),
}


class MetricsJSONL(Logger):
    """Appends every ``log_metrics`` call as one JSON line to ``<save_dir>/metrics.jsonl`` (rank 0 only).

    A resumed run appends to the same file; :func:`read_metrics` drops the steps a restart repeats.
    Non-finite values are written as ``null`` (JSON has no NaN).
    """

    def __init__(self, save_dir: str | Path) -> None:
        super().__init__()
        self.path = Path(save_dir) / METRICS_FILE
        self._file: Any = None

    @property
    def name(self) -> str:
        return "metrics_jsonl"

    @property
    def version(self) -> str:
        return ""

    @property
    def save_dir(self) -> str:
        return str(self.path.parent)

    @rank_zero_only
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        """Nothing: the run folder already holds the config (``resolved_config.yaml``)."""

    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed in finalize)
            self._file.write(json.dumps(START_RECORD) + "\n")  # a (re)start: read_metrics drops what it repeats
        record: dict[str, Any] = {"step": step}
        for key, value in metrics.items():
            value = float(value)
            record[key] = value if math.isfinite(value) else None
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    @rank_zero_only
    def finalize(self, status: str) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def read_metrics(path: str | Path) -> dict[str, list[tuple[int, float]]]:
    """``{name: [(step, value), ...]}`` from a ``metrics.jsonl``, steps ascending.

    Every process that writes the file starts with a :data:`START_RECORD`; the first step ``S`` logged after
    one drops the earlier records from ``S`` on (a run resumed from a checkpoint older than its last logged
    step repeats them), as TensorBoard purges orphaned events. Within one process steps may go back by one
    (the online evaluation after optimiser step ``N`` logs ``N``, Lightning then logs that step's loss as
    ``N - 1``) and nothing is dropped. Of several values at one step the last wins; ``null`` values are skipped.
    """
    series: dict[str, dict[int, float]] = {}
    restarted = False
    path = Path(path)
    if not path.is_file():
        return {}
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a killed run
            continue
        if record == START_RECORD:
            restarted = True
            continue
        step = record.pop("step", None)
        if step is None:
            continue
        step = int(step)
        if restarted:
            for values in series.values():
                for s in [s for s in values if s >= step]:
                    del values[s]
            restarted = False
        for key, value in record.items():
            if value is not None:
                series.setdefault(key, {})[step] = float(value)
    return {key: sorted(values.items()) for key, values in series.items() if values}


def _check_installed(name: str, target: str) -> None:
    cls_name = target.rsplit(".", 1)[-1]
    if cls_name not in OPTIONAL_PACKAGES:
        return
    module, install = OPTIONAL_PACKAGES[cls_name]
    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"logger={name} needs the '{module}' package, which is not installed: {install}")


def build_loggers(config: Mapping[str, Mapping[str, Any]], run_dir: str | Path) -> list[Logger]:
    """Lightning loggers from ``cfg.logger`` (``{name: {_target_: class path, **kwargs}}``), then
    :class:`MetricsJSONL` last.

    ``save_dir: null`` means the run folder; MLflow's ``tracking_uri: null`` MLflow's own default
    (``mlflow.get_tracking_uri()``); any other ``null`` leaves the logger's own default.
    A TensorBoard logger comes first, making it ``trainer.logger``: the image previews and the online
    evaluation write to that one's ``SummaryWriter``. A logger whose package is missing fails here,
    before any work, naming the ``pip install`` that adds it.
    """
    from hydra.utils import instantiate

    run_dir = Path(run_dir)
    loggers: list[Logger] = []
    for name, options in config.items():
        options = dict(options)
        target = options.get("_target_")
        if not target:
            raise ConfigError(f"logger.{name} needs a '_target_' (a Lightning logger class, e.g. lightning.pytorch.loggers.CSVLogger)")
        _check_installed(name, target)
        if "save_dir" in options and options["save_dir"] is None:
            options["save_dir"] = str(run_dir)
        if target.endswith("MLFlowLogger") and options.get("tracking_uri") is None:
            import mlflow  # Lightning's default is ./mlruns, a store MLflow 3 refuses by default

            options["tracking_uri"] = mlflow.get_tracking_uri()
        options = {key: value for key, value in options.items() if value is not None}
        loggers.append(instantiate(options, _convert_="all"))
    loggers.sort(key=lambda logger: not isinstance(logger, TensorBoardLogger))  # stable: TensorBoard first
    return [*loggers, MetricsJSONL(run_dir)]


def local_log_dirs(loggers: Sequence[Logger], run_dir: str | Path) -> list[str]:
    """Names of the entries directly under ``run_dir`` that ``loggers`` write into (``tensorboard``,
    ``csv``, ...), for setting an earlier run's logs aside; loggers without a log folder there (an MLflow
    server, W&B, :class:`MetricsJSONL`, whose file is :data:`METRICS_FILE`) add nothing."""
    run_dir = Path(run_dir).resolve()
    names: list[str] = []
    for logger in loggers:
        if not logger.log_dir:
            continue
        path = Path(logger.log_dir).resolve()
        if path != run_dir and path.is_relative_to(run_dir):
            names.append(path.relative_to(run_dir).parts[0])
    return names


class ForwardOnlineMetrics(L.Callback):
    """Sends the online evaluation's ``online/*`` values to every logger it does not write to itself.

    :class:`~ssl_med.train.online_eval.OnlineEval` adds its scalars to ``trainer.logger``'s
    TensorBoard writer only; this callback, placed right after it, logs each new entry of its
    ``history`` (and ``online/seconds``) through ``log_metrics`` to the other loggers (CSV, W&B,
    MLflow, ``metrics.jsonl``), at the step it was evaluated.
    """

    def __init__(self, online: Any) -> None:
        self.online = online
        self._sent = 0

    def _forward(self, trainer: L.Trainer) -> None:
        if not trainer.is_global_zero or len(self.online.history) <= self._sent:
            return
        first = trainer.logger
        writes_itself = first is not None and hasattr(getattr(first, "experiment", None), "add_scalar")
        targets = [lg for lg in trainer.loggers if not (writes_itself and lg is first)]
        for entry in self.online.history[self._sent :]:
            entry = dict(entry)
            step = int(entry.pop("step"))
            metrics = {f"online/{key}": float(value) for key, value in entry.items()}
            metrics["online/seconds"] = float(self.online.seconds)
            for lg in targets:
                lg.log_metrics(metrics, step=step)
        self._sent = len(self.online.history)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A resumed run restores the history its checkpoint holds; the entries before the resume step were
        # sent by the earlier process, the one at that step is sent again so that it is the first record
        # after the restart, which :func:`read_metrics` then keeps (the records it replaces are repeats).
        self._sent = sum(1 for entry in self.online.history if int(entry["step"]) < trainer.global_step)
        self._forward(trainer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        self._forward(trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._forward(trainer)
