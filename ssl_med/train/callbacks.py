"""Callbacks carrying cross-cutting behaviour: atomic checkpoints, stopping on signals, image previews,
encoder export."""

from __future__ import annotations

import json
import logging
import os
import signal
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor

from ssl_med.data.channels import batch_channel_names, is_placeholder
from ssl_med.lifetimes import Interrupted, StopSignals
from ssl_med.train.checkpoints import PARTIAL_SAVE
from ssl_med.train.sharding import full_encoder, is_sharded

log = logging.getLogger(__name__)


def _keep_storage(storage: Any, location: str) -> Any:
    return storage


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (a no-op where directories cannot be opened, as on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes a checkpoint to a temporary file, flushes it to disk and renames it into place: a run
    killed mid-save (or a machine that loses power) never leaves a truncated ``last.ckpt`` behind, only
    the previous one and a partial temporary file, which the next start removes
    (:func:`~ssl_med.train.checkpoints.remove_partial_saves`). Loads with ``weights_only=True`` always,
    whatever the caller or ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` says: a checkpoint (``resume=<path>``
    may name any file) is tensors and plain data, never code to unpickle."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}{PARTIAL_SAVE}{os.getpid()}")
        with open(tmp, "wb") as f:
            torch.save(checkpoint, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)

    def load_checkpoint(
        self, path: str | os.PathLike, map_location: Any = _keep_storage, weights_only: bool | None = None
    ) -> dict[str, Any]:
        return super().load_checkpoint(path, map_location=map_location, weights_only=True)


class FinalCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` whose ``last.ckpt`` also holds the final steps: Lightning saves one at the end
    of training only if it never saved one, so when ``max_steps`` is not a multiple of
    ``every_n_train_steps`` (or ``max_time`` ends the run) ``last.ckpt`` lacked the last steps and a
    re-run repeated them."""

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.save_last and not self._should_skip_saving_checkpoint(trainer):  # steps since the last save
            self._save_last_checkpoint(trainer, self._monitor_candidates(trainer))
        super().on_train_end(trainer, pl_module)


class StopOnSignal(L.Callback):
    """Ends training after the step in which SIGINT or SIGTERM arrived (recorded by ``stop``), with the
    state saved to ``checkpoint`` (``last.ckpt``) so that ``resume=auto`` continues from that step.

    The stop comes at the end of a step, never inside one, so the saved state is consistent. With more
    than one process, a signal seen by any of them stops all of them at the same step. Lightning's own
    SIGTERM handling (which raises ``SIGTERMException`` after a step, and under SLURM requeues the job on
    its requeue signal) saves the same way. A second Ctrl+C interrupts at once and saves nothing: the
    previous ``last.ckpt`` stays.
    """

    def __init__(self, stop: StopSignals, checkpoint: Path) -> None:
        self.stop = stop
        self.checkpoint = checkpoint
        self.saved: Path | None = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        stopping = self.stop.received is not None
        if trainer.world_size > 1:
            stopping = trainer.strategy.reduce_boolean_decision(stopping, all=False)
        if stopping:
            raise Interrupted(self.stop.received or signal.SIGTERM, f"stopped at step {trainer.global_step}")

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if isinstance(exception, (Interrupted, SIGTERMException)):
            trainer.save_checkpoint(self.checkpoint)
            self.saved = self.checkpoint

    def interrupted(self, trainer: L.Trainer) -> Interrupted:
        """The one-line report of the stop, after ``trainer.fit`` ended with it."""
        signum = self.stop.received or signal.SIGTERM
        saved = f"saved {self.saved}" if self.saved else "nothing saved"
        return Interrupted(
            signum, f"stopped by {signal.Signals(signum).name} after step {trainer.global_step}; {saved}; "
            "run the same command again to resume",
        )  # fmt: skip


#: channels of each image a preview shows (one row each); the rest are named in the log line
PREVIEW_CHANNELS = 4


def _preview_grid(
    images: dict[str, Tensor], max_items: int = 4, max_channels: int = PREVIEW_CHANNELS
) -> Tensor:
    """A ``(3, R H, N W)`` grid of the named images ``(B, C, H, W)`` or ``(B, C, D, H, W)`` (3D: the
    central slice): one column per name; one row per image and channel, image-major (the first
    ``max_channels`` channels of each of the first ``max_items`` images, ``R = items x channels``).

    Each tile is scaled to ``[0, 1]`` on its own; a column with fewer channels or smaller images
    than the others has black tiles or black margins there. One channel: grey rows, one per image.
    """
    columns = []
    for tensor in images.values():
        x = tensor[:max_items].detach().float().cpu()
        if x.ndim == 5:  # (B, C, D, H, W) -> central axial slice
            x = x[:, :, x.shape[2] // 2]
        x = x[:, :max_channels]
        lo = x.amin(dim=(2, 3), keepdim=True)
        hi = x.amax(dim=(2, 3), keepdim=True)
        columns.append((x - lo) / (hi - lo).clamp_min(1e-6))
    items = min(x.shape[0] for x in columns)
    channels = max(x.shape[1] for x in columns)
    height = max(x.shape[2] for x in columns)
    width = max(x.shape[3] for x in columns)
    grid = torch.zeros(items * channels * height, len(columns) * width)
    for j, x in enumerate(columns):
        for i in range(items):
            for c in range(x.shape[1]):
                top = (i * channels + c) * height
                grid[top : top + x.shape[2], j * width : j * width + x.shape[3]] = x[i, c]
    return grid.expand(3, -1, -1)


def _preview_rows(
    images: dict[str, Tensor], batch: Any, max_items: int = 4, max_channels: int = PREVIEW_CHANNELS
) -> str | None:
    """What the rows of :func:`_preview_grid` are, for multi-channel previews (``None`` for one channel):
    the batch's channel names where every shown image has real ones (one list per image when they
    differ), else channel indices, and how many channels are left out."""
    channels = max(int(t.shape[1]) for t in images.values())
    if channels <= 1:
        return None
    shown = min(channels, max_channels)
    names = (batch_channel_names(batch) if isinstance(batch, Mapping) else None) or []
    names = names[:max_items]
    if names and all(len(n) == channels and not is_placeholder(n) for n in names):
        labels = ["/".join(n[:shown]) for n in names]
        same = len(set(labels)) == 1
        rows = labels[0] if same else "; ".join(f"image {i}: {n}" for i, n in enumerate(labels))
    else:
        rows = "/".join(f"channel {c}" for c in range(shown))
    left = f" ({channels - shown} more channels not shown)" if channels > shown else ""
    return f"one row per image and channel: {rows}{left}"


class PreviewImages(L.Callback):
    """Every ``every_n_steps``, logs the objective's :meth:`~ssl_med.objective.Objective.preview`
    (e.g. input | masked input | reconstruction) to TensorBoard (``trainer.logger`` when it has
    ``add_image``; without a TensorBoard logger there are no previews). Multi-channel images get one
    row per channel (:func:`_preview_grid`), named once in the log and in a TensorBoard text."""

    def __init__(self, every_n_steps: int) -> None:
        self.every_n_steps = every_n_steps
        self._described: set[str] = set()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        if self.every_n_steps <= 0 or step % self.every_n_steps:
            return
        experiment = getattr(trainer.logger, "experiment", None) if trainer.is_global_zero else None
        wanted = hasattr(experiment, "add_image")
        objective = pl_module.objective
        if is_sharded(objective):  # every rank joins the forward's all-gathers; rank 0 logs
            if not trainer.strategy.broadcast(wanted):
                return
            objective.unshard()
            images = objective.preview(batch)
            objective.reshard()
        elif wanted:
            images = objective.preview(batch)
        else:
            return
        if images and wanted:
            tag = "preview/" + "|".join(images)
            experiment.add_image(tag, _preview_grid(images), step)
            rows = _preview_rows(images, batch)
            if rows is not None and f"{tag}: {rows}" not in self._described:
                self._described.add(f"{tag}: {rows}")
                log.info("%s: %s", tag, rows)
                if hasattr(experiment, "add_text"):
                    experiment.add_text(tag + "/rows", rows, step)


def weight_checksum(module: torch.nn.Module) -> Tensor:
    """A float64 fingerprint of all parameters (sum of ``w * (1 + position)``), equal across equal copies;
    a 0-d tensor on the CPU."""
    total = torch.zeros((), dtype=torch.float64)
    for i, p in enumerate(module.parameters()):
        weights = torch.linspace(1, 2, p.numel(), dtype=torch.float64, device=p.device)
        total += (p.detach().double().flatten() * weights).sum().cpu() * (i + 1)
    return total


class ExportEncoder(L.Callback):
    """Writes the trained encoder (safetensors + config) into the run folder when training ends, after
    checking that every process holds the same weights (their checksums go to ``rank_checksums.json``).
    A sharded (FSDP) encoder is gathered into an ordinary one first.

    The encoder written is :meth:`~ssl_med.objective.Objective.eval_encoder`: the EMA teacher where the
    objective keeps one (DINO, VoCo ``version="original"``), as DINO, DINOv2 and RAD-DINO evaluate and release theirs,
    else the trained encoder. It is the encoder the online curve reads and ``online_eval.keep_best`` exports,
    so the last point of the curve is the encoder in ``encoder/``; ``config.json`` records which
    (``exported_weights``)."""

    def __init__(self, out_dir: Path, config: dict[str, Any]) -> None:
        self.out_dir = out_dir
        self.config = config

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        encoder = full_encoder(pl_module.objective.eval_encoder(), self.config["backbone"])  # FSDP: gathered
        checksum = weight_checksum(encoder).to(pl_module.device)  # NCCL gathers device tensors only
        checksums = trainer.strategy.all_gather(checksum).reshape(-1).tolist()
        if trainer.is_global_zero:
            from ssl_med.export import save_encoder

            if max(checksums) - min(checksums) > 1e-6 * max(abs(c) for c in checksums):
                raise RuntimeError(f"processes finished with different encoder weights (checksums {checksums})")
            save_encoder(encoder, self.out_dir, {**self.config, "exported_weights": pl_module.objective.eval_weights()})
            (self.out_dir / "rank_checksums.json").write_text(json.dumps(checksums))


#: the picture :class:`PlotCurves` draws in the run folder
CURVES_FILE = "training_curves.png"


class PlotCurves(L.Callback):
    """Writes :data:`CURVES_FILE` (loss terms, collapse monitor, lr, throughput, online evaluation)
    at the end of training, from the run's ``metrics.jsonl``."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = run_dir

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            from ssl_med.train.loggers import METRICS_FILE
            from ssl_med.train.plots import plot_training_curves

            for logger in trainer.loggers:
                logger.save()
            plot_training_curves(self.run_dir / METRICS_FILE, self.run_dir / CURVES_FILE)
