"""DINOv2 as RAD-DINO trains it: DINO CLS loss + iBOT masked-patch loss + KoLeo, 2D and 3D (``objective=dino``).

Recipe (Oquab et al., "DINOv2", TMLR 2024, ``facebookresearch/dinov2``; Pérez-García et al., "RAD-DINO",
Nat. Mach. Intell. 2025):

* **Views** (:class:`MultiCropViews`, per sample in the DataLoader workers; its options are the
  ``views:`` group of the objective's config): 2 global crops
  (random-scale crop of area fraction ``global_crop_scale`` resized to ``global_crop_size``) and
  ``n_local_crops`` local crops (``local_crop_scale``, resized to ``local_crop_size``), each flipped and
  intensity-jittered; global 1 always blurred, global 2 blurred with p 0.1 and solarised with p 0.2,
  locals blurred with p 0.5.
* **Student**: the encoder on the two global crops with iBOT masks (masked patch embeddings replaced
  by the encoder's mask token) and on the local crops (unmasked); a :class:`DINOHead` on the pooled
  (CLS) token and on the masked patch tokens (shared head by default, as ViT-S/B configs).
* **Teacher**: an EMA copy of encoder and head(s) (``m`` cosine ``momentum_teacher -> 1`` over the
  run), run on the unmasked global crops. Targets are centered-and-sharpened softmaxes
  (``softmax((t - c) / tau_t)``, center EMA 0.9, ``tau_t`` linear warm-up
  ``warmup_teacher_temp -> teacher_temp``) or Sinkhorn-Knopp assignments.
* **Loss** = ``dino_loss_weight * (L_glob + L_loc)`` (average over the ``G (G-1) + G L`` cross-view
  pairs) ``+ ibot_loss_weight * L_ibot`` (per-image normalised, divided by ``2B``)
  ``+ koleo_loss_weight * (KoLeo(crop-1 CLS) + KoLeo(crop-2 CLS))`` on the student's backbone pooled
  tokens of the masked global crops.
* **iBOT masks** (:class:`BlockMaskGenerator`, :func:`ibot_masks`): ``int(2B * mask_probability)``
  global crops get a block-wise (BEiT) mask whose target ratio is drawn inside the i-th of evenly
  spread bins of ``mask_ratio_min_max``; the rest are unmasked; masks are shuffled over the crops.

Schedules live in :meth:`DINO.on_train_step_end` (called after every optimiser step): EMA update with
``m(step)``, and the step counter that drives the teacher temperature and last-layer freezing.

Trainer wiring (optional, documented hooks):
    * :meth:`DINO.lr_multipliers` -- ``{parameter name: lr multiplier}`` for layer-wise LR decay
      (``layerwise_decay ** (depth + 1 - layer_id)``) times ``patch_embed_lr_mult`` on the patch
      embedding; names are those of ``objective.named_parameters()``. Heads get 1.
    * :meth:`DINO.clip_gradients` -- DINOv2's per-module gradient clipping (backbone, DINO head, iBOT
      head clipped separately); call it instead of global clipping after ``backward``.
    * The teacher is a copy of the encoder at construction; load pretrained student weights into the
      encoder *before* building the objective, or call :meth:`DINO.reset_teacher` afterwards.

Deviations from the reference, on purpose:
    * Crops: integer sides drawn uniformly and independently per axis between ``ceil(lo ** (1 / nd) s)``
      and ``ceil(hi ** (1 / nd) s)`` for a crop scale ``(lo, hi)`` and input side ``s`` (which replaces
      RandomResizedCrop's aspect-ratio draw), resized bilinear / trilinear;
      grey-level jitter only (brightness = intensity scaling, contrast = scaling about the mean, no
      saturation / hue / grayscale: medical images are grey); flips on ``flip_axes`` (default the last
      axis = horizontal flip, as the reference); blur sigma ``(0.1, 2.0)`` is given for a 224 px crop
      and scaled with the crop size; no ImageNet normalisation (inputs stay in ``[0, 1]``).
    * Crop sizes default to the incoming crop (globals) and ``96/224`` of it (locals), rounded to
      multiples of the patch size.
    * Schedules are in optimiser steps, or fractions of the run when below 1, not in 1250-iteration
      "epochs": ``warmup_teacher_temp_steps`` and ``freeze_last_layer_steps`` (reference: 30 and 1 of
      100 epochs = 0.3 and 0.01 of the run).
    * The center update is applied right after the targets are computed (the reference defers it
      to the next call: the same values are used for the same steps). The iBOT center is the global
      mean over all masked tokens of all ranks (reference: per-rank mean averaged over ranks).
    * 3D block masks draw one log-aspect per axis, centered so the sides multiply to the area (2D is
      the reference's ``h = sqrt(area * ar)``, ``w = sqrt(area / ar)``).
    * Last-layer freezing zeroes the prototype gradients with a tensor hook (the reference sets their
      learning rate to 0); with the weight-normalised layer the decoupled weight decay on ``weight_v``
      cannot change the prototypes and ``weight_g`` is a 1-D (no-decay) parameter.
    * KoLeo on a batch of one image is 0 (the reference returns ``-log(1e-8 sqrt(D) + 1e-8)``).
    * The collapse monitor gets the student's pooled embeddings of global crop 1 (masked).
"""

from __future__ import annotations

import copy
import logging
import math
import random
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from objectives.dino_heads import BlockMaskGenerator, DINOHead, ibot_masks
from objectives.losses.dino import (
    dino_cross_view_loss,
    ibot_patch_loss,
    koleo_loss,
    sinkhorn_knopp,
    softmax_center,
    update_center,
)
from objectives.views import MultiCropViews
from ssl_med.data.channels import encoder_channel_kwargs
from ssl_med.encoder import Encoder
from ssl_med.geometry import CropSpec, ViewGeometry
from ssl_med.layers.patch_embed import patchify, unpatchify
from ssl_med.objective import Objective, ObjectiveOutput, Sample
from ssl_med.optim import layer_decay_scales
from ssl_med.registry import OBJECTIVES
from ssl_med.train.ema import INITIAL_SHARE_WARN, ema_update, initial_share
from ssl_med.train.schedules import cosine_schedule, linear_warmup, steps_of

log = logging.getLogger(__name__)

Centering = Literal["centering", "sinkhorn_knopp"]


# -- the objective --------------------------------------------------------------------------------
@OBJECTIVES.register("dino")
class DINO(Objective):
    """DINOv2 (DINO + iBOT + KoLeo) with an EMA teacher; see the module docstring.

    Args:
        encoder: any :class:`~ssl_med.encoder.Encoder` (2D or 3D) supporting ``mask=``.
        out_dim, hidden_dim, bottleneck_dim, head_nlayers: DINO head (reference 65536, 2048, 256, 3).
        ibot_separate_head: own iBOT head (ViT-L/g configs) instead of sharing the DINO head.
        ibot_out_dim: prototypes of a separate iBOT head (default ``out_dim``).
        views: keyword arguments of :class:`~objectives.views.MultiCropViews` (``n_local_crops``,
            ``global_crop_size``, ``local_crop_size``, ``local_crop_fraction``, ``global_crop_scale``,
            ``local_crop_scale``, ``flip_axes``, ``flip_prob``, ``jitter_prob``, ``brightness``,
            ``contrast``, ``blur_sigma``, ``solarize_prob``); missing ones take its defaults (the
            reference: 8 locals, scales (0.32, 1) / (0.05, 0.32), local 96 of 224 px). On the command
            line: ``objective.views.n_local_crops=2``.
        student_temp: ``tau_s`` (0.1).
        teacher_temp, warmup_teacher_temp, warmup_teacher_temp_steps: ``tau_t`` linear warm-up
            ``0.04 -> 0.07`` over the given optimiser steps, or fraction of the run below 1 (reference:
            30 of 100 epochs = 0.3).
        centering: ``"centering"`` (EMA center) or ``"sinkhorn_knopp"``.
        center_momentum: center EMA (0.9). sinkhorn_iterations: 3.
        momentum_teacher, momentum_teacher_end: EMA momentum, cosine over the run (0.992 -> 1).
        dino_loss_weight, ibot_loss_weight, koleo_loss_weight: 1, 1, 0.1.
        mask_probability: fraction of global crops that get an iBOT mask (0.5).
        mask_ratio_min_max: ratio range spread over the masked crops ((0.1, 0.5)).
        mask_min_num_patches: smallest mask box (4). mask_max_fraction: largest box as a grid fraction (0.5).
        freeze_last_layer_steps: prototypes get no gradient for this many steps, or fraction of the run
            below 1 (reference 1 of 100 epochs = 0.01).
        layerwise_decay, patch_embed_lr_mult: for :meth:`lr_multipliers` (0.9, 0.2).
        head_checkpoint: optional ``.safetensors``/``.pt`` state dict of the DINO head to start from
            (continued pretraining, e.g. RAD-DINO's ``dino_head.safetensors``).
    """

    def __init__(
        self,
        encoder: Encoder,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        head_nlayers: int = 3,
        ibot_separate_head: bool = False,
        ibot_out_dim: int | None = None,
        views: Mapping[str, Any] | None = None,
        student_temp: float = 0.1,
        teacher_temp: float = 0.07,
        warmup_teacher_temp: float = 0.04,
        warmup_teacher_temp_steps: float = 37500,
        centering: Centering = "centering",
        center_momentum: float = 0.9,
        sinkhorn_iterations: int = 3,
        momentum_teacher: float = 0.992,
        momentum_teacher_end: float = 1.0,
        dino_loss_weight: float = 1.0,
        ibot_loss_weight: float = 1.0,
        koleo_loss_weight: float = 0.1,
        mask_probability: float = 0.5,
        mask_ratio_min_max: Sequence[float] = (0.1, 0.5),
        mask_min_num_patches: int = 4,
        mask_max_fraction: float = 0.5,
        freeze_last_layer_steps: float = 1250,
        layerwise_decay: float = 0.9,
        patch_embed_lr_mult: float = 0.2,
        head_checkpoint: str | None = None,
    ) -> None:
        super().__init__(encoder)
        if centering not in ("centering", "sinkhorn_knopp"):
            raise ValueError(f"centering must be 'centering' or 'sinkhorn_knopp', got {centering!r}")
        if len(mask_ratio_min_max) != 2 or not 0.0 <= mask_ratio_min_max[0] <= mask_ratio_min_max[1] <= 1.0:
            raise ValueError(f"mask_ratio_min_max must be (lo, hi) in [0, 1], got {mask_ratio_min_max}")
        self.views = MultiCropViews(encoder.spatial_dims, encoder.patch_size, **(views or {}))
        self.student_temp = student_temp
        self.teacher_temp = teacher_temp
        self.warmup_teacher_temp = warmup_teacher_temp
        self.warmup_teacher_temp_steps = warmup_teacher_temp_steps
        self.centering = centering
        self.center_momentum = center_momentum
        self.sinkhorn_iterations = sinkhorn_iterations
        self.momentum_teacher = momentum_teacher
        self.momentum_teacher_end = momentum_teacher_end
        self.dino_loss_weight = dino_loss_weight
        self.ibot_loss_weight = ibot_loss_weight
        self.koleo_loss_weight = koleo_loss_weight
        self.mask_probability = mask_probability
        self.mask_ratio_min_max = (float(mask_ratio_min_max[0]), float(mask_ratio_min_max[1]))
        self.mask_min_num_patches = mask_min_num_patches
        self.mask_max_fraction = mask_max_fraction
        self.freeze_last_layer_steps = freeze_last_layer_steps
        self.layerwise_decay = layerwise_decay
        self.patch_embed_lr_mult = patch_embed_lr_mult

        d = encoder.embed_dim
        self.head = DINOHead(d, out_dim, hidden_dim, bottleneck_dim, head_nlayers)
        if head_checkpoint is not None:
            self.head.load_state_dict(_load_state_dict(head_checkpoint))
        self.ibot_head = (
            DINOHead(d, ibot_out_dim or out_dim, hidden_dim, bottleneck_dim, head_nlayers) if ibot_separate_head else None
        )
        ibot_k = (ibot_out_dim or out_dim) if ibot_separate_head else out_dim
        self.register_buffer("dino_center", torch.zeros(1, out_dim))
        self.register_buffer("ibot_center", torch.zeros(1, ibot_k))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))  # completed optimiser steps

        self.teacher = nn.ModuleDict()
        self.reset_teacher()
        for layer in self._last_layers():
            for p in layer.parameters():
                p.register_hook(self._freeze_hook)

    # -- teacher ----------------------------------------------------------------------------------
    def _student_modules(self) -> dict[str, nn.Module]:
        mods: dict[str, nn.Module] = {"encoder": self.encoder, "head": self.head}
        if self.ibot_head is not None:
            mods["ibot_head"] = self.ibot_head
        return mods

    @torch.no_grad()
    def reset_teacher(self) -> None:
        """(Re)initialise the teacher as a frozen copy of the student (encoder and heads)."""
        for name, module in self._student_modules().items():
            teacher = copy.deepcopy(module)
            for p in teacher.parameters():
                p.requires_grad_(False)
            self.teacher[name] = teacher.eval()
        self.teacher.eval()  # the container too: the same modules are in eval mode before and after train()

    def train(self, mode: bool = True) -> DINO:
        super().train(mode)
        self.teacher.eval()  # no drop-path / dropout in the teacher, as the reference
        return self

    def eval_mode_modules(self) -> list[nn.Module]:
        return [self.teacher]

    def _last_layers(self) -> list[nn.Module]:
        layers = [self.head.last_layer]
        if self.ibot_head is not None:
            layers.append(self.ibot_head.last_layer)
        return layers

    def _freeze_hook(self, grad: Tensor) -> Tensor:
        if self.training and int(self.step) < steps_of(self.freeze_last_layer_steps, self.max_steps):
            return torch.zeros_like(grad)
        return grad

    # -- schedules ---------------------------------------------------------------------------------
    def current_teacher_temp(self) -> float:
        warmup = steps_of(self.warmup_teacher_temp_steps, self.max_steps)
        return linear_warmup(int(self.step), warmup, self.warmup_teacher_temp, self.teacher_temp)

    def teacher_momentum(self, step: int, max_steps: int) -> float:
        """EMA momentum used after optimiser step ``step`` (1-based) of ``max_steps``."""
        return cosine_schedule(step - 1, max_steps, self.momentum_teacher, self.momentum_teacher_end)

    def set_run_length(self, max_steps: int) -> None:
        """Also report a run too short for the momentum schedule: its teacher (the encoder the run exports and
        the online curve reads) would end as a blend of the trained weights and the random initialisation."""
        super().set_run_length(max_steps)
        share = initial_share(self.teacher_momentum(s, max_steps) for s in range(1, max_steps + 1))
        if share > INITIAL_SHARE_WARN:
            log.warning(
                "DINO: with objective.momentum_teacher=%g -> %g over %d steps the EMA teacher still holds %.0f%% of its "
                "random initialisation at the end, and the teacher is what the run exports and the online curve reads; "
                "train longer; with online_eval.student=true (the small_2d / small_3d recipes) the student is read "
                "beside it and encoder_best/ keeps the better of the two on val (ssl_med export weights=student "
                "exports the student of any checkpoint)",
                self.momentum_teacher, self.momentum_teacher_end, max_steps, 100 * share,
            )  # fmt: skip

    def eval_encoder(self) -> nn.Module:
        return self.teacher["encoder"]

    @torch.no_grad()
    def on_train_step_end(self, step: int, max_steps: int) -> None:
        m = self.teacher_momentum(step, max_steps)
        for name, module in self._student_modules().items():
            ema_update(self.teacher[name], module, m)
        self.step.fill_(step)

    # -- views ------------------------------------------------------------------------------------
    def view_transform(self) -> Callable[[Sample], Sample]:
        return self.views

    @classmethod
    def view_geometry(cls, crop: CropSpec, options: Mapping[str, Any]) -> ViewGeometry:
        """Any data crop works (crops are resized); the encoder is built for the global crops."""
        views = cls.options_with_defaults(options)["views"] or {}
        glob, loc = MultiCropViews(crop.spatial_dims, crop.patch_size, **views).crop_sizes(crop.crop_size)
        return ViewGeometry(glob, {"global": glob, "local": loc})

    def make_masks(self, n_images: int, grid: Sequence[int], device: torch.device | None = None) -> Tensor:
        """iBOT masks ``(n_images, N)`` for the global crops (drawn from torch's RNG state)."""
        generator = BlockMaskGenerator(
            grid,
            min_num_patches=self.mask_min_num_patches,
            max_num_patches=self.mask_max_fraction * math.prod(grid),
        )
        rng = random.Random(int(torch.randint(0, 2**62, (1,))))
        return ibot_masks(n_images, generator, self.mask_probability, self.mask_ratio_min_max, rng).to(device)

    # -- the step ---------------------------------------------------------------------------------
    def _teacher_targets(self, logits: Tensor, center: Tensor, temp: float, update: bool) -> Tensor:
        if self.centering == "sinkhorn_knopp":
            return sinkhorn_knopp(logits, temp, self.sinkhorn_iterations)
        probs = softmax_center(logits, center, temp)
        if update:
            update_center(center, logits, self.center_momentum)
        return probs

    def forward(self, batch: dict[str, Any], masks: Tensor | None = None) -> ObjectiveOutput:
        """One DINOv2 step.

        Args:
            batch: ``global_crops (B, 2, C, *G)``, ``local_crops (B, L, C, *L_size)`` from :class:`MultiCropViews`.
            masks: optional ``(2B, N)`` bool iBOT masks for the global crops, ordered crop-1 images then
                crop-2 images (tests); drawn with :meth:`make_masks` otherwise.

        Returns:
            ``loss`` and the terms ``dino_global``, ``dino_local``, ``ibot``, ``koleo`` (unweighted)
            plus ``teacher_temp``; ``embeddings`` ``(B, D)``.
        """
        glob = batch["global_crops"]
        b, n_global = glob.shape[:2]
        if n_global != 2:
            raise ValueError(f"expected 2 global crops per sample, got {n_global}")
        glob = glob.transpose(0, 1).flatten(0, 1)  # (2B, C, *G): all crop-1, then all crop-2
        local = batch.get("local_crops")
        n_local = 0 if local is None else local.shape[1]
        grid = self.encoder.grid_shape(glob.shape[2:])
        if masks is None:
            masks = self.make_masks(2 * b, grid, glob.device)
        masks = masks.to(device=glob.device, dtype=torch.bool)
        temp = self.current_teacher_temp()
        update = self.training
        teacher_ibot_head = self.teacher["ibot_head"] if self.ibot_head is not None else self.teacher["head"]

        # teacher on the unmasked global crops
        with torch.no_grad():
            t_out = self.teacher["encoder"](glob, **encoder_channel_kwargs(self.encoder, batch, repeat=2))
            t_cls = self.teacher["head"](t_out.pooled)  # (2B, K)
            t_probs = self._teacher_targets(t_cls, self.dino_center, temp, update)
            t_probs = t_probs.view(2, b, -1)
            t_patch = teacher_ibot_head(t_out.patch_tokens[masks])  # (M, K_ibot)
            t_patch_probs = self._teacher_targets(t_patch, self.ibot_center, temp, update)

        # student on masked global crops and unmasked local crops
        s_out = self.encoder(glob, mask=masks, **encoder_channel_kwargs(self.encoder, batch, repeat=2))
        s_cls_backbone = s_out.pooled  # (2B, D)
        s_masked_tokens = s_out.patch_tokens[masks]  # (M, D)
        if self.ibot_head is None:
            s_both = self.head(torch.cat([s_cls_backbone, s_masked_tokens]))
            s_cls, s_patch = s_both[: 2 * b], s_both[2 * b :]
        else:
            s_cls, s_patch = self.head(s_cls_backbone), self.ibot_head(s_masked_tokens)
        student_views = [s_cls.view(2, b, -1)]
        if n_local:
            local = local.transpose(0, 1).flatten(0, 1)  # (L B, C, *L_size)
            channels = encoder_channel_kwargs(self.encoder, batch, repeat=n_local)
            student_views.append(self.head(self.encoder(local, **channels).pooled).view(n_local, b, -1))
        student_logits = torch.cat(student_views)  # (2 + L, B, K)

        # cross-view pairs only: student crop 1 <-> teacher crop 2 and vice versa, locals <-> both
        dino_global, dino_local = dino_cross_view_loss(t_probs, student_logits, self.student_temp)
        ibot = ibot_patch_loss(t_patch_probs, s_patch, masks, self.student_temp)
        koleo = koleo_loss(s_cls_backbone[:b]) + koleo_loss(s_cls_backbone[b:])
        loss = (
            self.dino_loss_weight * (dino_global + dino_local)
            + self.ibot_loss_weight * ibot
            + self.koleo_loss_weight * koleo
        )
        terms = {
            "dino_global": dino_global.detach(),
            "dino_local": dino_local.detach(),
            "ibot": ibot.detach(),
            "koleo": koleo.detach(),
            "teacher_temp": torch.tensor(temp),
        }
        return ObjectiveOutput(loss=loss, terms=terms, embeddings=s_cls_backbone[:b].detach())

    # -- trainer helpers --------------------------------------------------------------------------
    def lr_multipliers(self) -> dict[str, float]:
        """Per-parameter learning-rate multipliers for the trainable parameters (keys as ``named_parameters()``).

        Encoder: layer-wise decay ``layerwise_decay ** (depth + 1 - layer_id)`` with the encoder's
        :meth:`~ssl_med.encoder.Encoder.layer_id` (0 for the stem: patch embedding, position/CLS/register/
        mask tokens; ``i + 1`` for block ``i``; ``depth + 1`` for the final norm); the encoder's
        :meth:`~ssl_med.encoder.Encoder.patch_embed_names` are further multiplied by
        ``patch_embed_lr_mult``. Heads: 1.
        """
        scales = layer_decay_scales(self.encoder, self.layerwise_decay, prefix="encoder.")
        for name in self.encoder.patch_embed_names():
            scales[f"encoder.{name}"] *= self.patch_embed_lr_mult
        return {name: scales.get(name, 1.0) for name, p in self.named_parameters() if p.requires_grad}

    def clip_gradients(self, max_norm: float) -> dict[str, Tensor]:
        """Clip the gradient norm of backbone, DINO head and iBOT head separately (DINOv2); returns the norms."""
        norms = {}
        for name, module in self._student_modules().items():
            params = [p for p in module.parameters() if p.grad is not None]
            if params:
                norms[name] = nn.utils.clip_grad_norm_(params, max_norm)
        return norms

    @torch.no_grad()
    def preview(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        glob = batch["global_crops"]
        out = {"global_crop_1": glob[:, 0], "global_crop_2": glob[:, 1]}
        local = batch.get("local_crops")
        if local is not None and local.shape[1]:
            out["local_crop_1"] = local[:, 0]
        images = glob[:, 0]
        grid = self.encoder.grid_shape(images.shape[2:])
        masks = self.make_masks(images.shape[0], grid, images.device)
        patches = patchify(images, self.encoder.patch_size) * (~masks).unsqueeze(-1)
        out["ibot_masked"] = unpatchify(patches, grid, self.encoder.patch_size, images.shape[1])
        return out


def _load_state_dict(path: str) -> dict[str, Tensor]:
    p = Path(path)
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(p))
    state = torch.load(p, map_location="cpu", weights_only=True)
    return state.get("state_dict", state) if isinstance(state, dict) else state

