"""Making Lightning's DDP process launcher re-run exactly one Hydra job.

Lightning starts the extra processes of a ``ddp`` run by re-executing ``sys.argv`` with
``hydra.run.dir=<run.dir>`` appended. Under ``ssl_med <command>`` that command line is not runnable
(``sys.argv[0]`` is the command's display name), and under ``-m`` (multirun) it would start the whole
sweep again in every child, each with its own output folders (the Hydra x Lightning DDP bug family,
Lightning #11617, #18145). While ``trainer.fit`` runs, :func:`relaunch_this_job` points both at this
job only: ``python <ssl_med/__main__.py> pretrain <this job's overrides>`` in this job's output folder.
Afterwards it tears the process group down and restores the environment Lightning changed, so the
next job of a sweep starts its own processes.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from omegaconf import OmegaConf

ENTRY = str(Path(__file__).resolve().parents[1] / "__main__.py")


@contextmanager
def relaunch_this_job(command: str) -> Iterator[None]:
    """Within the block, DDP children re-run ``ssl_med <command>`` with this job's overrides and folder."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        yield
        return
    hydra_cfg = HydraConfig.get()
    saved_argv, saved_run_dir, saved_env = sys.argv, hydra_cfg.run.dir, dict(os.environ)
    sys.argv = [ENTRY, command, *hydra_cfg.overrides.task]
    OmegaConf.set_readonly(hydra_cfg, False)
    hydra_cfg.run.dir = hydra_cfg.runtime.output_dir  # Lightning appends hydra.run.dir=<this>
    try:
        yield
    finally:
        sys.argv = saved_argv
        hydra_cfg.run.dir = saved_run_dir
        # the next job of a sweep starts its own process group with new children
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
        os.environ.clear()
        os.environ.update(saved_env)
