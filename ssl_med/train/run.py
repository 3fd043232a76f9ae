"""``ssl_med pretrain``: build encoder, objective and data from a config and train them with Lightning.

A run folder holds everything of one run::

    <run dir>/
      .hydra/                Hydra's composed config and overrides
      resolved_config.yaml   the validated, fully resolved config
      checkpoints/           last.ckpt (resume point) and periodic step checkpoints
      tensorboard/           loss terms, learning rate, samples/s, collapse monitor, previews (logger=tensorboard)
      metrics.jsonl          every logged scalar, one JSON object per logging step (whatever the loggers)
      encoder/               model.safetensors + config.json (the exported encoder)
      encoder_best/          the best-on-val encoder of the online curve (online_eval.keep_best)
      online_eval.json       the online curve (online_eval.data)
      training_curves.png    loss terms, collapse monitor, lr and throughput at a glance
      earlier-<time>/        an earlier run's checkpoints, encoders, curves, metrics and logs, moved here when a run
                             starts afresh in the same folder (resume=never), so none of them is read as this run's
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import asdict
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.warnings import PossibleUserWarning
from omegaconf import OmegaConf

from ssl_med.build import build_encoder
from ssl_med.config import ConfigError, PretrainConfig
from ssl_med.data.datamodule import CropDataModule
from ssl_med.encoder import Encoder, config_input_size
from ssl_med.evaluators.report import ONLINE_EVAL_FILE
from ssl_med.lifetimes import Interrupted, StopSignals
from ssl_med.objective import Objective
from ssl_med.registry import OBJECTIVES
from ssl_med.train.callbacks import (
    CURVES_FILE,
    AtomicCheckpointIO,
    ExportEncoder,
    FinalCheckpoint,
    PlotCurves,
    PreviewImages,
    StopOnSignal,
)
from ssl_med.train.checkpoints import (
    checkpoint_problem,
    continues_here,
    newest_good_checkpoint,
    remove_partial_saves,
    set_aside_earlier_run,
)
from ssl_med.train.compile import compile_settings
from ssl_med.train.launch import relaunch_this_job
from ssl_med.train.loggers import METRICS_FILE, ForwardOnlineMetrics, build_loggers, local_log_dirs
from ssl_med.train.module import PretrainModule
from ssl_med.train.online_eval import build_online_eval
from ssl_med.train.sharding import SHARDED_STRATEGIES, build_strategy

log = logging.getLogger(__name__)

LAST_CHECKPOINT = "last.ckpt"
BEST_DIR = "encoder_best"  # online_eval.keep_best's export


def first_process() -> bool:
    """Whether this is the job's first process (local rank 0 on node 0), the one that writes the run folder's
    own files before Lightning sets up its ranks."""
    return int(os.environ.get("LOCAL_RANK", "0")) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0


def build_objective(objective: dict, encoder: Encoder) -> Objective:
    kwargs = dict(objective)
    return OBJECTIVES.build(kwargs.pop("name"), encoder=encoder, **kwargs)


def resume_checkpoint(resume: str, checkpoint_dir: Path) -> str | None:
    """The checkpoint to continue from: ``auto`` -> ``last.ckpt``, or the newest readable step checkpoint
    when ``last.ckpt`` is empty or damaged (:mod:`ssl_med.train.checkpoints`); ``never`` -> none; else a path."""
    if resume == "never":
        return None
    if resume == "auto":
        try:
            found = newest_good_checkpoint(checkpoint_dir, LAST_CHECKPOINT)
        except ValueError as err:
            raise ConfigError(f"resume=auto: {err}; resume=never starts afresh") from err
        return None if found is None else str(found)
    if not Path(resume).exists():
        raise ConfigError(f"resume={resume!r}: not 'auto', 'never' or an existing checkpoint (file, or folder of shards)")
    problem = checkpoint_problem(Path(resume))
    if problem:
        raise ConfigError(f"resume={resume!r}: {problem}")
    return resume


def expect_eval_mode(objective: Objective) -> None:
    """Silence Lightning's "Found N module(s) in eval mode" warning when the N modules are exactly the
    ones the objective keeps in eval mode by design (:meth:`Objective.eval_mode_modules`); any other
    count still warns."""
    count = sum(1 for module in objective.eval_mode_modules() for _ in module.modules())
    if count:
        log.info("%d modules of the objective (its EMA teacher) stay in eval mode by design", count)
        warnings.filterwarnings(
            "ignore", message=rf"Found {count} module\(s\) in eval mode", category=PossibleUserWarning
        )


def expect_module_batch_hooks() -> None:
    """Silence Lightning's "You have overridden `on_*_batch_transfer` in `LightningModule` but have passed
    in a `LightningDataModule`" warning: it is raised whenever the module has the hook and a datamodule is
    given, and says only that the module's hook runs, which is the design (:class:`PretrainModule` counts
    skipped samples and normalises raw crops there). The warning for a hook *both* define still shows."""
    for hook in ("on_before_batch_transfer", "on_after_batch_transfer"):
        warnings.filterwarnings("ignore", message=rf"You have overridden `{hook}` in `LightningModule` but")


def expect_lightning_leafspec() -> None:
    """Silence torch's "`isinstance(treespec, LeafSpec)` is deprecated" FutureWarning, raised once per run from
    Lightning's own ``utilities/_pytree.py`` (Lightning 2.6 against torch >= 2.10): it is about Lightning's code,
    not the user's, and says nothing a user can act on. Raised from anywhere else it still shows."""
    warnings.filterwarnings(
        "ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated", category=FutureWarning,
        module=r"lightning\.pytorch\.utilities\._pytree",
    )


def pretrain(cfg: PretrainConfig, run_dir: str | Path) -> Path:
    """Train ``cfg`` into ``run_dir``; returns the folder of the exported encoder."""
    t = cfg.trainer
    if cfg.online_eval.data and t.strategy in SHARDED_STRATEGIES:
        raise ConfigError(
            f"online_eval evaluates the encoder on rank 0 alone, which a sharded (trainer.strategy={t.strategy}) "
            "encoder cannot do; set online_eval.data=null and evaluate the export afterwards"
        )
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if first_process():
        OmegaConf.save(OmegaConf.structured(cfg), run_dir / "resolved_config.yaml")
    loggers = build_loggers(cfg.logger, run_dir)  # a missing optional package fails here, before any work
    checkpoint_dir = run_dir / "checkpoints"
    remove_partial_saves(checkpoint_dir)  # left by a save that was killed before its rename
    ckpt_path = resume_checkpoint(cfg.resume, checkpoint_dir)
    if ckpt_path:
        log.info("resuming from %s", ckpt_path)
    export_dir = run_dir / "encoder"
    if not continues_here(ckpt_path, checkpoint_dir) and first_process():
        earlier = [checkpoint_dir.name, export_dir.name, BEST_DIR, ONLINE_EVAL_FILE, METRICS_FILE, CURVES_FILE]
        set_aside_earlier_run(run_dir, [*earlier, *local_log_dirs(loggers, run_dir)])
    for logger in loggers:
        logger.log_hyperparams(asdict(cfg))
    L.seed_everything(cfg.seed, workers=True, verbose=False)

    encoder = build_encoder(cfg.backbone)
    objective = build_objective(cfg.objective, encoder)
    if cfg.trainer.activation_checkpointing:
        encoder.set_grad_checkpointing(True)
    module = PretrainModule(
        objective, cfg.optim, cfg.trainer.max_steps, compile=compile_settings(cfg.trainer), backbone=cfg.backbone["name"]
    )
    data = CropDataModule(cfg.data, objective.view_transform(), cfg.seed, objective.geometric_views)

    export_config = {"backbone": cfg.backbone, "objective": cfg.objective, "data": asdict(cfg.data)}
    callbacks: list[L.Callback] = [
        FinalCheckpoint(
            dirpath=checkpoint_dir,
            filename="step{step:07d}",
            auto_insert_metric_name=False,
            every_n_train_steps=t.checkpoint_every_n_steps,
            save_last=True,
            save_top_k=1,
        ),
        PreviewImages(t.preview_every_n_steps),
        ExportEncoder(export_dir, export_config),
        PlotCurves(run_dir),
    ]
    input_size = config_input_size(cfg.backbone) or list(cfg.data.crop_size)
    online = build_online_eval(
        cfg.online_eval, input_size, encoder.in_chans, run_dir / ONLINE_EVAL_FILE, run_dir / BEST_DIR, export_config
    )
    if online is not None:  # before PlotCurves, whose picture then holds the final evaluation
        at = callbacks.index(next(c for c in callbacks if isinstance(c, PlotCurves)))
        callbacks[at:at] = [online, ForwardOnlineMetrics(online)]
    if t.progress_bar:
        callbacks.append(TQDMProgressBar(refresh_rate=1))
    stop = StopSignals("run")  # SIGINT / SIGTERM: save last.ckpt after the current step and stop
    stopper = StopOnSignal(stop, checkpoint_dir / LAST_CHECKPOINT)
    callbacks.append(stopper)
    trainer = L.Trainer(
        max_steps=t.max_steps,
        max_time=t.max_time,
        accelerator=t.accelerator,
        devices=t.devices,
        strategy=build_strategy(t.strategy),
        num_nodes=t.num_nodes,
        precision=t.precision,
        logger=loggers,
        callbacks=callbacks,
        plugins=[AtomicCheckpointIO()],
        log_every_n_steps=t.log_every_n_steps,
        enable_progress_bar=t.progress_bar,
        enable_model_summary=False,
        use_distributed_sampler=False,
        max_epochs=-1,
        default_root_dir=str(run_dir),
    )
    expect_eval_mode(objective)
    expect_module_batch_hooks()
    expect_lightning_leafspec()
    try:
        with relaunch_this_job("pretrain"), stop:
            trainer.fit(module, datamodule=data, ckpt_path=ckpt_path, weights_only=True)  # never unpickle code
    except (Interrupted, SIGTERMException):
        raise stopper.interrupted(trainer) from None
    if cfg.evaluate and trainer.is_global_zero:
        evaluate_run(run_dir, cfg.evaluate, cfg.evaluate_on, seed=cfg.seed)
    return export_dir


def evaluate_run(run_dir: Path, evaluators: list[str], data: str, seed: int = 0) -> None:
    """Run ``ssl_med evaluate eval=<name> eval_data=<data> checkpoint=<run_dir>`` for each name,
    writing to ``<run_dir>/eval/<name>-<data>/``."""
    from ssl_med.evaluators.api import evaluate_checkpoint
    from ssl_med.evaluators.datasets import compose_evaluate

    for name in evaluators:
        cfg = compose_evaluate([f"eval={name}", f"eval_data={data}", f"checkpoint={run_dir}", f"seed={seed}"])
        evaluate_checkpoint(
            str(run_dir),
            OmegaConf.to_container(cfg.eval, resolve=True),
            OmegaConf.to_container(cfg.eval_data, resolve=True),
            run_dir / "eval" / f"{name}-{data}",
            baseline=bool(cfg.baseline),
            device=cfg.device,
            cache_dir=cfg.cache_dir,
            seed=seed,
        )
