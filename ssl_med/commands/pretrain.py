"""``ssl_med pretrain [overrides]``: self-supervised pretraining (config ``conf/pretrain.yaml``)."""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from ssl_med.commands import Command, run_hydra


def _task(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from ssl_med.train.geometry import prepare_pretrain_config
    from ssl_med.train.run import pretrain

    logging.getLogger("lightning.pytorch").propagate = False  # Lightning prints its own; avoid doubles
    hydra = HydraConfig.get()
    # validated, and the crop / backbone.img_size fitted to the objective's views, before any work
    parsed = prepare_pretrain_config(cfg, hydra.overrides.task)
    out = pretrain(parsed, hydra.runtime.output_dir)
    print(f"encoder written to {out}")


COMMAND = Command(
    help="self-supervised pretraining; Hydra overrides, e.g. backbone=vit objective=mae data=demo3d, -m for sweeps",
    run=lambda args: run_hydra("pretrain", "ssl_med pretrain", _task, args),
)
