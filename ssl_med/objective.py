"""The objective interface: an objective owns its views, heads, teacher and loss.

The Lightning module only wires ``encoder + objective + optimiser``::

    objective = OBJECTIVES.build("mae", encoder=encoder, **cfg)
    views = objective.view_transform()      # per-sample, runs in DataLoader workers
    out = objective(batch)                  # ObjectiveOutput(loss, terms, embeddings)
    objective.on_train_step_end(step, max_steps)   # e.g. EMA teacher update

``batch`` is the collated output of the view transform; its ``"image"`` key holds the crops
``(B, C, *S)`` sampled by the data module.

Before anything is built, :meth:`Objective.view_geometry` tells from the data config alone whether
the crops fit the objective's views and what size the encoder sees (:mod:`ssl_med.geometry`)::

    OBJECTIVES.get("voco").view_geometry(CropSpec((32, 96, 96), (8, 8, 8)), cfg).encoder_size  # (32, 32, 32)
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from torch import Tensor, nn

from ssl_med.encoder import Encoder
from ssl_med.geometry import CropSpec, ViewGeometry, patch_multiple_crop

Sample = dict[str, Any]


@dataclass
class ObjectiveOutput:
    """Result of one objective step.

    Attributes:
        loss: scalar to minimise.
        terms: named, detached loss terms for logging (``{"mae": ...}``).
        embeddings: ``(B, D)`` pooled encoder embeddings of this step, for the collapse monitor.
    """

    loss: Tensor
    terms: dict[str, Tensor] = field(default_factory=dict)
    embeddings: Tensor | None = None


class Objective(nn.Module, ABC):
    """Base class of all pretraining objectives.

    Args:
        encoder: the trained encoder (student); exported at the end of pretraining.

    Attributes:
        eval_features: the feature pooling evaluators use for this objective's encoders (``auto``).
        geometric_views: the view transform only moves voxels (flips, crops, masks) and never reads
            intensities, so the data module may hand crops over raw and normalise them after the
            transfer (half the bytes for int16 images; ``data.normalise=auto``).
    """

    geometric_views: bool = False
    #: frozen features that represent this objective's encoder (``eval.features=auto``): ``pooled``
    #: (CLS / pooled embedding, trained by DINO, VoCo, graph matching) or ``mean_patch`` (MAE-family
    #: objectives, whose losses never touch the CLS token; timm's MAE models pool the same way)
    eval_features: str = "pooled"
    #: registered backbone names this objective pairs with (``None``: every backbone); the pair
    #: matrix skips the others with :attr:`backbone_reason` (see :meth:`pairing_problem`)
    backbones: ClassVar[tuple[str, ...] | None] = None
    backbone_reason: ClassVar[str] = ""

    def __init__(self, encoder: Encoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.max_steps = 0  # set by set_run_length

    def view_transform(self) -> Callable[[Sample], Sample]:
        """Per-sample transform from a data-module crop to this objective's views (default: none)."""
        return _identity

    @classmethod
    def view_geometry(cls, crop: CropSpec, options: Mapping[str, Any]) -> ViewGeometry:
        """The views this objective makes of data crops ``(C, *crop.crop_size)``, from the configs alone.

        Runs before anything is built. Objectives whose views are not the crop itself override it.

        Args:
            crop: data crop size, encoder patch size and batch size.
            options: the objective's config (constructor arguments; missing ones take their defaults,
                see :meth:`options_with_defaults`).

        Returns:
            the view sizes; ``encoder_size`` is the size the backbone is built for (``img_size``).

        Raises:
            GeometryError: the crop (or an option) does not fit; the message names the fixing override.

        Default: the encoder sees the crop itself, so it must be a multiple of the patch.
        """
        size = patch_multiple_crop(crop)
        return ViewGeometry(size, {"image": size})

    @classmethod
    def pairing_problem(cls, backbone: str) -> str | None:
        """Why this objective does not pair with the registered ``backbone``, or ``None`` when it does."""
        if cls.backbones is None or backbone in cls.backbones:
            return None
        return cls.backbone_reason or f"pairs only with backbones {', '.join(cls.backbones)}"

    @classmethod
    def options_with_defaults(cls, options: Mapping[str, Any]) -> dict[str, Any]:
        """``options`` (a config mapping; ``name`` is dropped) over the constructor's default arguments."""
        params = inspect.signature(cls.__init__).parameters.values()
        defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
        return {**defaults, **{k: v for k, v in options.items() if k != "name"}}

    @abstractmethod
    def forward(self, batch: dict[str, Any]) -> ObjectiveOutput:
        """Compute the loss of one collated batch."""

    def preview(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Named images ``(B, C, *S)`` worth looking at (input, masked input, reconstruction...)."""
        return {}

    def no_weight_decay(self) -> set[str]:
        """Trainable parameter names (``named_parameters()`` keys) without weight decay besides biases
        and 1-D parameters: the encoder's :meth:`~ssl_med.encoder.Encoder.no_weight_decay`; objectives
        add their own tokens (e.g. a decoder's mask token)."""
        return {f"encoder.{name}" for name in self.encoder.no_weight_decay()}

    def lr_multipliers(self) -> dict[str, float]:
        """Learning-rate multiplier per trainable parameter name (``named_parameters()`` keys); missing
        names get 1. Objectives use it for layer-wise decay or slower patch embeddings."""
        return {}

    def clip_gradients(self, max_norm: float) -> dict[str, Tensor]:
        """Clip gradients before the optimiser step; returns the pre-clipping norm(s) for logging.

        Default: one global norm over all parameters. Objectives may clip module by module (DINOv2).
        """
        params = [p for p in self.parameters() if p.grad is not None]
        return {"all": nn.utils.clip_grad_norm_(params, max_norm)} if params else {}

    def on_train_step_end(self, step: int, max_steps: int) -> None:
        """Hook after each optimiser step (EMA teachers, schedules); ``step`` counts from 1."""

    def set_run_length(self, max_steps: int) -> None:
        """Told once, before training, how many optimiser steps the run has (schedules given as
        fractions of the run resolve against it)."""
        self.max_steps = max_steps

    def eval_encoder(self) -> nn.Module:
        """The encoder whose features represent this objective now: the EMA teacher where the
        objective keeps one (its features are the ones DINO/VoCo report), else the trained encoder."""
        return self.encoder

    def eval_weights(self) -> str:
        """Which encoder :meth:`eval_encoder` is: ``"teacher"`` or ``"student"`` (recorded with exports as
        ``exported_weights``, the names ``ssl_med export weights=...`` takes)."""
        return "student" if self.eval_encoder() is self.encoder else "teacher"

    def eval_mode_modules(self) -> list[nn.Module]:
        """Sub-modules kept in eval mode while the rest trains, by design (e.g. an EMA teacher run
        without drop-path); the trainer tells Lightning they are intentional. Default: none."""
        return []


def _identity(sample: Sample) -> Sample:
    return sample
