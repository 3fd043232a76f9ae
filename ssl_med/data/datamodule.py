"""LightningDataModule handing store crops to the objective's view transform."""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Callable
from functools import partial
from typing import Any

import lightning as L
import torch
from lightning.fabric.utilities.seed import pl_worker_init_function
from torch.utils.data import DataLoader

from ssl_med.config import DataConfig
from ssl_med.data.crops import EpochSampler, RandomCropDataset
from ssl_med.lifetimes import init_worker
from ssl_med.registry import SOURCES

log = logging.getLogger(__name__)


def resolve_store(cfg: DataConfig) -> str:
    """Path/URL of the image store that ``cfg.source`` names (built or checked by the source)."""
    kwargs: dict[str, Any] = {"spatial_dims": cfg.spatial_dims}
    if cfg.store is not None:
        kwargs["store"] = cfg.store
    if cfg.path is not None:
        kwargs["path"] = cfg.path
    if cfg.ingest:
        kwargs["ingest"] = dict(cfg.ingest)
    return SOURCES.build(cfg.source, **kwargs)


class CropDataModule(L.LightningDataModule):
    """Random crops from an image store, transformed into an objective's views.

    Args:
        cfg: the ``data`` config group.
        view_transform: the objective's per-sample transform (runs in the workers).
        seed: crop sampling seed.
        geometric_views: the views only move voxels, so ``data.normalise=auto`` hands raw crops over
            when training on an accelerator (unless channels are averaged) and the model normalises
            them there after the transfer (:func:`ssl_med.data.intensity.normalise_batch`); on the CPU
            the workers normalise (the main process would otherwise do it on the training cores).

    Workers are started with ``spawn`` (zarr v3 handles are not fork-safe once the parent has read
    data); each worker opens its own store handle, dies with the training process and ignores SIGINT /
    SIGTERM (the training process stops cleanly and shuts them down: :mod:`ssl_med.lifetimes`).
    """

    def __init__(
        self, cfg: DataConfig, view_transform: Callable[[dict], dict], seed: int = 0, geometric_views: bool = False
    ) -> None:
        super().__init__()
        if cfg.normalise not in ("auto", "worker", "batch"):
            raise ValueError(f"data.normalise must be auto, worker or batch, got {cfg.normalise!r}")
        if cfg.normalise == "batch" and not geometric_views:
            raise ValueError("data.normalise=batch needs an objective whose views do not change intensities")
        self.cfg = cfg
        self.view_transform = view_transform
        self.seed = seed
        self.geometric_views = geometric_views
        self.dataset: RandomCropDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if len(self.cfg.crop_size) != self.cfg.spatial_dims:
            raise ValueError(
                f"data.crop_size {self.cfg.crop_size} does not have spatial_dims={self.cfg.spatial_dims} values"
            )
        if self.dataset is None:
            self.dataset = RandomCropDataset(
                resolve_store(self.cfg),
                crop_size=self.cfg.crop_size,
                num_channels=self.cfg.num_channels,
                slice_axis=self.cfg.slice_axis,
                length=self.cfg.samples_per_epoch,
                seed=self.seed,
                split=self.cfg.split,
                transform=self.view_transform,
                min_foreground=self.cfg.min_foreground,
                normalise=self.normalise_mode(),
                on_error=self.cfg.on_error,
                max_error_fraction=self.cfg.max_error_fraction,
                small_images=self.cfg.small_images,
                large_images=self.cfg.large_images,
                window_mode=self.cfg.intensity_window,
                return_channel_names=True,
                channel_dropout=self.cfg.channel_dropout,
                channels=self.cfg.channels,
            )
            held_out = sorted({m.split for m in self.dataset.metas} & {"val", "test"})
            if held_out:
                log.warning(
                    "pretraining reads the %s split(s) of %s (data.split=%s): evaluations on them are not held out; "
                    "use data.split=train (or auto)", "/".join(held_out), self.dataset.store_path, self.cfg.split,
                )

    def normalise_mode(self) -> str:
        """``data.normalise`` resolved: ``worker``, ``batch``, or ``auto`` (the dataset's choice)."""
        if not self.geometric_views:
            return "worker"
        if self.cfg.normalise != "auto":
            return self.cfg.normalise
        device = self.trainer.strategy.root_device if self.trainer is not None else torch.device("cpu")
        return "worker" if device.type == "cpu" else "auto"

    def train_dataloader(self) -> DataLoader:
        assert self.dataset is not None, "call setup() first"
        trainer = self.trainer
        rank = trainer.global_rank if trainer is not None else 0
        world = trainer.world_size if trainer is not None else 1
        batch = self.cfg.batch_size

        def consumed() -> int:  # samples the whole job has used so far (restored on resume)
            return trainer.global_step * batch * world if trainer is not None else 0

        workers = self.cfg.num_workers
        seed_workers = bool(int(os.environ.get("PL_SEED_WORKERS", "0")))  # L.seed_everything(workers=True)
        return DataLoader(
            self.dataset,
            batch_size=batch,
            sampler=EpochSampler(self.cfg.samples_per_epoch, rank, world, consumed),
            num_workers=workers,
            persistent_workers=workers > 0,
            multiprocessing_context=multiprocessing.get_context("spawn") if workers > 0 else None,
            worker_init_fn=partial(init_loader_worker, os.getpid(), rank, seed_workers) if workers > 0 else None,
            drop_last=True,
        )


def init_loader_worker(parent_pid: int, rank: int, seed_workers: bool, worker_id: int) -> None:
    """A DataLoader worker dies with the training process and leaves SIGINT / SIGTERM to it
    (:func:`ssl_med.lifetimes.init_worker`), then is seeded as Lightning would have seeded it (Lightning
    adds its own initialiser only to loaders that have none)."""
    init_worker(parent_pid)
    if seed_workers:
        pl_worker_init_function(worker_id, rank)
