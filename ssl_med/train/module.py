"""The Lightning module: wires encoder + objective + optimiser, nothing else."""

from __future__ import annotations

import logging
import time
from typing import Any

import lightning as L
import torch
from torch import Tensor

from ssl_med.config import OptimConfig
from ssl_med.data.faults import SKIPPED_KEY
from ssl_med.data.intensity import normalise_batch
from ssl_med.objective import Objective
from ssl_med.optim import build_optimizer, param_groups
from ssl_med.train.collapse import CollapseMonitor, effective_rank, embedding_std
from ssl_med.train.compile import CompileGuard, CompileSettings, compile_children
from ssl_med.train.schedules import steps_of, warmup_cosine
from ssl_med.train.sharding import full_tensor, mixed_precision, shard_objective

log = logging.getLogger(__name__)


def _batch_size(batch: dict[str, Any]) -> int | None:
    """Images in a collated batch: the leading size of its first tensor (objectives name their views freely)."""
    return next((v.shape[0] for v in batch.values() if isinstance(v, Tensor) and v.ndim), None)


class PretrainModule(L.LightningModule):
    """Trains ``objective`` (which holds the encoder) with AdamW and per-step schedules.

    Args:
        objective: the objective, holding ``objective.encoder``.
        optim: optimiser settings (peak LR, warmup, cosine decay, weight-decay schedule).
        max_steps: total optimiser steps (for the schedules).
        compile: compile the encoder and heads (``trainer.compile``, :mod:`ssl_med.train.compile`);
            ``None``: eager.
        backbone: the backbone's registered name, for messages (default: the encoder's class name).
    """

    def __init__(
        self,
        objective: Objective,
        optim: OptimConfig,
        max_steps: int,
        compile: CompileSettings | None = None,
        backbone: str | None = None,
    ) -> None:
        super().__init__()
        self.objective = objective
        self.compile_settings = compile
        self.compile_guard = CompileGuard(backbone or type(objective.encoder).__name__) if compile else None
        self._model_configured = False
        self.optim = optim
        self.max_steps = max_steps
        self.warmup_steps = steps_of(optim.warmup_steps, max_steps)
        objective.set_run_length(max_steps)
        self.collapse = CollapseMonitor()
        self._t_last: float | None = None
        self.data_draws = 0  # draws and skipped draws this rank's loader reported (data.on_error=skip)
        self.skipped_draws = 0
        self._pending_skips: Tensor | None = None  # the next batch's per-sample counts, taken off on the host

    @property
    def encoder(self) -> torch.nn.Module:
        return self.objective.encoder

    def configure_model(self) -> None:
        """Lightning's set-up hook, once the strategy is known (once; it may run again for later
        stages): under ``trainer=fsdp`` shard the objective per encoder block
        (:mod:`ssl_med.train.sharding`), then compile the encoder and the objective's heads in place
        when ``trainer.compile`` is on."""
        if self._model_configured:
            return
        self._model_configured = True
        if self.device_mesh is not None:  # set by Lightning's ModelParallelStrategy (trainer=fsdp)
            blocks = shard_objective(self.objective, self.device_mesh["data_parallel"], mixed_precision(self.trainer.precision))
            log.info("FSDP: %d encoder/decoder blocks sharded over %d processes", blocks, self.device_mesh.size())
        if self.compile_settings is not None:
            names = compile_children(self.objective, self.compile_settings)
            log.info("torch.compile (mode %s) on %s", self.compile_settings.mode, ", ".join(names))

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        if self.compile_guard is None:
            super().backward(loss, *args, **kwargs)
        else:  # the compiled backward is built at its first call
            self.compile_guard.backward(lambda: super(PretrainModule, self).backward(loss, *args, **kwargs))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """``optim.name`` (AdamW by default; timm's factory, so also ``lamb``, ``lars``, ``sgd``) over the
        trainable parameters, one group per (weight decay on/off, lr multiplier).

        No weight decay on biases, 1-D parameters and :meth:`~ssl_med.objective.Objective.no_weight_decay`
        (the encoder's position/CLS/register/mask tokens, decoder tokens); multipliers come from
        :meth:`~ssl_med.objective.Objective.lr_multipliers`.
        """
        groups = param_groups(
            self.objective,
            self.optim.weight_decay,
            no_weight_decay=self.objective.no_weight_decay(),
            lr_scale=self.objective.lr_multipliers(),
        )
        return build_optimizer(
            groups, self.optim.name, self.optim.lr, self.optim.weight_decay, self.optim.betas, self.optim.momentum
        )

    def _apply_schedules(self, optimizer: torch.optim.Optimizer) -> None:
        lr = self.optim_lr()
        wd = warmup_cosine(self.global_step, self.max_steps, self.optim.weight_decay, self.optim.weight_decay_end)
        for group in optimizer.param_groups:
            group["lr"] = lr * group["lr_scale"]
            if group["apply_wd"]:
                group["weight_decay"] = wd

    def configure_gradient_clipping(
        self, optimizer: torch.optim.Optimizer, gradient_clip_val: float | None = None, gradient_clip_algorithm: str | None = None
    ) -> None:
        if self.optim.grad_clip:
            for name, norm in self.objective.clip_gradients(self.optim.grad_clip).items():
                self.log(f"grad_norm/{name}", full_tensor(norm))  # FSDP: a DTensor

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Take ``data.on_error=skip``'s per-sample counts off the batch while it is on the host (the
        objectives never see them, and counting them needs no device sync)."""
        if isinstance(batch, dict) and SKIPPED_KEY in batch:
            batch = dict(batch)
            self._pending_skips = batch.pop(SKIPPED_KEY)
        return batch

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Raw crops (``data.normalise=batch``) become float32 ``[0, 1]`` here, on the device."""
        return normalise_batch(batch) if isinstance(batch, dict) else batch

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        self._apply_schedules(self.optimizers())
        if self._pending_skips is not None:
            self.log_skips(self._pending_skips)
            self._pending_skips = None
        out = self.objective(batch) if self.compile_guard is None else self.compile_guard.forward(lambda: self.objective(batch))
        if not torch.isfinite(out.loss):
            raise FloatingPointError(
                f"non-finite loss {out.loss.item()} at step {self.global_step}; lower optim.lr, enable "
                "optim.grad_clip, or check the data for NaNs (the last checkpoint is intact)"
            )
        batch_size = _batch_size(batch)
        self.log("train/loss", out.loss, prog_bar=True, batch_size=batch_size)
        for name, value in out.terms.items():
            self.log(f"train/{name}", value, batch_size=batch_size)
        if out.embeddings is not None:
            std, ideal = embedding_std(out.embeddings), out.embeddings.shape[1] ** -0.5
            self.log("collapse/embedding_std", std, batch_size=batch_size)
            self.log("collapse/embedding_std_ideal", ideal, batch_size=batch_size)
            if self.trainer.log_every_n_steps and self.global_step % self.trainer.log_every_n_steps == 0:
                # only on logged steps: the SVD and the host sync stay off the other steps
                rank, max_rank = effective_rank(out.embeddings), min(out.embeddings.shape)
                self.log("collapse/effective_rank", rank, batch_size=batch_size)
                self.collapse.update(float(std), ideal, self.global_step, rank, max_rank)
        self.log("train/lr", self.optim_lr(), batch_size=batch_size)
        now = time.perf_counter()
        if self._t_last is not None and batch_size:
            self.log("train/samples_per_s", batch_size * self.trainer.world_size / (now - self._t_last), prog_bar=True)
        self._t_last = now
        return out.loss

    def log_skips(self, skipped: Tensor) -> None:
        """``data/skipped_samples``: failed draws so far (all ranks, kept across resumes), and
        ``data/skipped_fraction``: of all draws (mean over ranks), from a batch's per-sample counts."""
        n = int(skipped.sum())
        self.skipped_draws += n
        self.data_draws += skipped.numel() + n
        self.log("data/skipped_samples", float(self.skipped_draws), reduce_fx="sum", sync_dist=True)
        self.log("data/skipped_fraction", self.skipped_draws / max(self.data_draws, 1), sync_dist=True)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["ssl_med_data_draws"] = {"draws": self.data_draws, "skipped": self.skipped_draws}

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        counts = checkpoint.get("ssl_med_data_draws", {})
        self.data_draws, self.skipped_draws = int(counts.get("draws", 0)), int(counts.get("skipped", 0))

    def optim_lr(self) -> float:
        """The scheduled base learning rate of this step (before per-parameter multipliers)."""
        return warmup_cosine(self.global_step, self.max_steps, self.optim.lr, self.optim.min_lr, self.warmup_steps)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.objective.on_train_step_end(self.global_step, self.max_steps)
