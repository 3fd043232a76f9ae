"""``ssl_med pretrain [overrides]``: self-supervised pretraining (config ``conf/pretrain.yaml``)."""

from __future__ import annotations

import logging
import sys

from omegaconf import DictConfig

from ssl_med.commands import Command, apply_num_threads, run_hydra
from ssl_med.lifetimes import Interrupted


def _task(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from lightning.pytorch.utilities import rank_zero_only

    from ssl_med.train.geometry import prepare_pretrain_config
    from ssl_med.train.run import pretrain

    apply_num_threads(cfg)
    logging.getLogger("lightning.pytorch").propagate = False  # Lightning prints its own; avoid doubles
    hydra = HydraConfig.get()
    # validated, and the crop / backbone.img_size fitted to the objective's views, before any work
    parsed = prepare_pretrain_config(cfg, hydra.overrides.task)
    try:
        out = pretrain(parsed, hydra.runtime.output_dir)
    except Interrupted as stop:  # SIGINT / SIGTERM: last.ckpt saved after the current step
        print(f"ssl_med pretrain: {stop}", file=sys.stderr)
        raise Stopped(stop.exit_code) from None
    if rank_zero_only.rank == 0:  # every process of a DDP/FSDP job returns here; the job reports once
        print(f"encoder written to {out}")


class Stopped(SystemExit):
    """Ends the command with ``128 + signal`` after the one-line report (past Hydra, no traceback)."""


def _run(args: list[str]) -> int:
    try:
        return run_hydra("pretrain", "ssl_med pretrain", _task, args)
    except Stopped as stopped:
        return int(stopped.code or 1)


COMMAND = Command(
    help="self-supervised pretraining; Hydra overrides, e.g. backbone=vit objective=mae data=demo3d, -m for sweeps",
    run=_run,
)
