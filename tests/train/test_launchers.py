"""Scale-out configs validated without a cluster: SLURM sweeps (submitit), DDP/FSDP trainer groups."""

from __future__ import annotations

import importlib

import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from ssl_med.config import parse_pretrain_config


def compose_with_hydra(*overrides: str):
    with initialize_config_module(config_module="ssl_med.conf", version_base="1.3"):
        return compose(config_name="pretrain", overrides=list(overrides), return_hydra_config=True)


def test_slurm_launcher_config_resolves_to_submitit() -> None:
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    cfg = compose_with_hydra("hydra/launcher=slurm", "trainer=ddp", "trainer.devices=4", "trainer.num_nodes=2")
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=False)
    assert launcher["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    module, _, name = launcher["_target_"].rpartition(".")
    assert hasattr(importlib.import_module(module), name)
    # one SLURM task per device, nodes from the trainer: what Lightning's SLURM environment expects
    assert cfg.hydra.launcher.tasks_per_node == 4 and cfg.hydra.launcher.gpus_per_node == 4
    assert cfg.hydra.launcher.nodes == 2


@pytest.mark.parametrize(("group", "strategy"), [("ddp", "ddp_find_unused_parameters_true"), ("fsdp", "fsdp")])
def test_trainer_groups(group: str, strategy: str) -> None:
    with initialize_config_module(config_module="ssl_med.conf", version_base="1.3"):
        cfg = compose(config_name="pretrain", overrides=[f"trainer={group}"])
    parsed = parse_pretrain_config(cfg)
    assert parsed.trainer.strategy == strategy and parsed.trainer.devices >= 2
