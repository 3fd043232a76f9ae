"""Typed config objects mirroring the YAML tree in ``conf/``.

``backbone`` and ``objective`` are free-form (their keys are the registered constructor's arguments,
checked by :meth:`ssl_med.registry.Registry.build`); every other group has a dataclass here, so a
misspelt key in a YAML file or an override fails before any work starts, with the valid keys listed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any

from omegaconf import DictConfig, OmegaConf


class ConfigError(ValueError):
    """An invalid configuration (unknown key, wrong type, missing value)."""


@dataclass
class DataConfig:
    name: str = "demo"
    source: str = "demo"
    license: str | None = None  # the data's licence id; model cards of exports default to it
    store: str | None = None
    path: str | None = None  # data=folder: a folder or file `ssl_med ingest` accepts
    ingest: dict[str, Any] = field(default_factory=dict)  # data=folder: ingest options (spacing, modality, ...)
    spatial_dims: int = 2
    crop_size: list[int] = field(default_factory=lambda: [64, 64])
    patch_size: int = 8
    num_channels: int | None = 1
    slice_axis: int = 0
    split: str | None = "auto"
    small_images: str = "resize"
    large_images: str = "crop"  # crop | resize: images larger than the crop (ssl_med/data/crops.py)
    intensity_window: str = "image"  # image | dtype | auto: what each image is scaled to [0, 1] from
    min_foreground: float = 0.0
    normalise: str = "auto"
    channel_dropout: float = 0.0  # modality dropout: per-channel drop probability (ssl_med/data/channels.py)
    channels: list[str] | None = None  # lay crops out by these channel names; a case's missing ones are zeros
    samples_per_epoch: int = 2048
    batch_size: int = 32
    num_workers: int = 2
    on_error: str = "raise"
    max_error_fraction: float = 0.05


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 5.0e-4
    min_lr: float = 1.0e-6
    warmup_steps: float = 0.07
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    momentum: float = 0.9
    weight_decay: float = 0.05
    weight_decay_end: float = 0.05
    grad_clip: float | None = 3.0


@dataclass
class TrainerConfig:
    max_steps: int = 300
    max_time: str | None = None
    accelerator: str = "auto"
    devices: Any = 1
    strategy: str = "auto"
    num_nodes: int = 1
    precision: str = "32-true"
    checkpoint_every_n_steps: int = 100
    log_every_n_steps: int = 10
    preview_every_n_steps: int = 100
    progress_bar: bool = True
    activation_checkpointing: bool = False
    compile: bool = False
    compile_mode: str = "default"


@dataclass
class OnlineEvalConfig:
    """``online_eval`` settings of ``ssl_med pretrain`` (``data: null`` switches it off).

    Attributes:
        data: an ``eval_data`` group name (``breastmnist``, ``pneumoniamnist``, ``vesselmnist3d``,
            ``medmnist`` with ``path``); classification data with train and val splits.
        path: replaces ``eval_data.path`` (e.g. any MedMNIST-style ``.npz`` with ``data=medmnist``).
        every_n_steps: evaluate every this many optimiser steps (also before step 1 and at the end).
        features: ``auto``, ``pooled``, ``mean_patch``, ``pooled+mean_patch`` or ``patch_tokens`` (as ``eval.features``).
        k, temperature: kNN neighbours and vote temperature.
        ridge: L2 strengths of the closed-form probe (relative to N, on standardised features); each
            evaluation uses the one with the best exact leave-one-out AUROC on train, or the decade beyond
            the grid's end where that scores higher still (one value: fixed).
        max_train, max_val: stratified subsets of the train (bank) and val (query) splits.
        batch_size: feature-extraction batch.
        keep_best: export the encoder of the best val value of this metric to ``encoder_best/``
            (model selection on val; ``null``: off). ``encoder/`` is always the last step's.
        student: where the objective keeps an EMA teacher (DINO, VoCo), also read the student and log
            its quality metrics as ``online/student_<metric>`` (twice the cost), and let ``keep_best``
            choose between the two: which of them reads better after a short run differs between data sets.
    """

    data: str | None = None
    path: str | None = None
    every_n_steps: int = 100
    features: str = "auto"
    k: int = 20
    temperature: float = 0.07
    ridge: list[float] = field(default_factory=lambda: [1.0e-6, 1.0e-5, 1.0e-4, 1.0e-3, 1.0e-2, 0.1, 1.0, 10.0])
    max_train: int | None = 2000
    max_val: int | None = 1000
    batch_size: int = 256
    keep_best: str | None = "linear_auroc"
    student: bool = False


@dataclass
class PretrainConfig:
    backbone: dict[str, Any]
    objective: dict[str, Any]
    data: DataConfig
    optim: OptimConfig
    trainer: TrainerConfig
    online_eval: OnlineEvalConfig = field(default_factory=OnlineEvalConfig)
    logger: dict[str, Any] = field(default_factory=dict)  # conf/logger: {name: {_target_: class, **kwargs}}
    seed: int = 0
    num_threads: int | None = None  # torch intra-op threads of this process (None: torch's default)
    resume: str = "auto"
    experiment: str = "run"
    evaluate: list[str] = field(default_factory=list)
    evaluate_on: str = "breastmnist"


def _check_group(group: str, cfg: DictConfig, schema: type) -> None:
    valid = {f.name for f in fields(schema)}
    unknown = sorted(set(cfg.keys()) - valid)
    if unknown:
        raise ConfigError(f"unknown key(s) {unknown} in '{group}'; valid keys: {', '.join(sorted(valid))}")


def parse_pretrain_config(cfg: DictConfig) -> PretrainConfig:
    """Validate a composed Hydra config and return typed objects (``backbone``/``objective`` as dicts)."""
    missing = sorted(OmegaConf.missing_keys(cfg))  # '???' in a YAML: a value the user must give
    if missing:
        raise ConfigError(f"missing value(s) for {', '.join(missing)}: give them on the command line, e.g. {missing[0]}=...")
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True))
    if isinstance(OmegaConf.select(cfg, "online_eval.ridge"), (int, float)):  # one fixed strength
        cfg.online_eval.ridge = [cfg.online_eval.ridge]
    groups = (("data", DataConfig), ("optim", OptimConfig), ("trainer", TrainerConfig), ("online_eval", OnlineEvalConfig))
    for group, schema in groups:
        if group not in cfg:
            continue
        _check_group(group, cfg[group], schema)
    top_unknown = sorted(set(cfg.keys()) - {f.name for f in fields(PretrainConfig)} - {"hydra"})
    if top_unknown:
        raise ConfigError(f"unknown top-level key(s) {top_unknown}")
    for group in ("backbone", "objective"):
        if "name" not in cfg[group]:
            raise ConfigError(f"'{group}' needs a 'name' (a registered {group}; see `ssl_med list`)")
    try:
        merged = OmegaConf.merge(OmegaConf.structured(PretrainConfig), cfg)
        parsed: PretrainConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except Exception as err:  # omegaconf's ValidationError / MissingMandatoryValue
        raise ConfigError(str(err)) from err
    _check_run_length(parsed.trainer)
    return parsed


def _check_run_length(trainer: TrainerConfig) -> None:
    """Refuse runs that cannot train: ``max_steps < 1`` would export the random initialisation as if it
    were pretrained (and the learning-rate and EMA schedules are defined over ``max_steps``)."""
    if trainer.max_steps < 1:
        raise ConfigError(
            f"trainer.max_steps={trainer.max_steps}: a run needs at least one optimiser step, else the "
            "exported encoder is its random initialisation (for a random-init baseline, evaluate with "
            "baseline=true instead)"
        )
