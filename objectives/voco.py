"""VoCo: volume contrast with geometric context priors (``objective=voco``), 3D and 2D, any backbone.

Reference: Wu et al., "VoCo" (CVPR 2024) and "Large-Scale 3D Medical Image Pre-training with
Geometric Context Priors" (TPAMI); code ``Luffy03/Large-Scale-Medical`` (``Self-supervised/
models/voco_head.py``) and ``Luffy03/VoCo`` (the "10k" version of the CVPR code).

Views (:class:`VoCoViews`, per sample in the DataLoader workers). The data module hands over a
*region* crop ``(C, D, H, W)`` (2D: ``(C, H, W)``). Its in-plane extent ``(H, W)`` is cut into a
``gh x gw`` grid of **base crops** ``(C, D, H/gh, W/gw)`` (full depth; 2D: ``(C, H/gh, W/gw)``), one
"class" per cell, and ``num_crops`` **random crops** of the same size are drawn at uniform integer
in-plane positions inside the region. Label ``y[k, g]`` = area of the random crop ``k`` overlapping
cell ``g`` (in-plane; the depth is fully covered) / crop area, so each row sums to 1. After the
labels are computed every crop is augmented independently (flips per axis, rot90 in-plane,
intensity shift), as the reference. The depth axis is the first spatial axis (the store's Z).

Model. Every crop is encoded (``encoder(x).pooled``, ``(n, D)``) and projected by a head
``Linear -> BN1d(affine=False, batch stats) -> ReLU -> Linear -> BN1d -> ReLU -> Linear``; the
prediction for a crop ``x`` and base ``b`` is ``l(x, b) = ReLU(cos(x, b))``.

Losses, per volume (then averaged over the batch), with ``y`` labels ``(K, G)``:

* position prediction ``pos(y, l) = -sum y log(1 - |y - l| + 1e-6) / (sum y + 1e-6)``;
* negative term on the cells with ``y == 0`` exactly: Large-Scale
  ``-sum log(1 - l + 1e-6) / (#zeros + 1e-6)``; original ``sum l^2 / (#zeros + 1e-6)``;
* base regulariser ``reg = mean_{k < k'} ReLU(cos(b_k, sg(b_k')))^2`` over the student bases;
* ``version="large_scale"`` (default, TPAMI): one backbone; student and EMA-teacher *projection
  heads* (momentum 0.9); the student head sees the embeddings after a feature dropout that zeroes
  whole rows; intra-volume ``pos + neg`` of ``(y, l(X_stu, B_tea))``; inter-volume term with the
  bases of volume ``j = (i + 1) mod B``: soft target ``P = sg(l(X_tea_i, B_tea_j))`` against
  ``Q = l(X_stu_i, B_stu_j)``, ``pos(P, Q) + neg(P, Q)``; total ``intra + inter + reg``;
* ``version="original"`` (the public ``Luffy03/VoCo`` code): an EMA teacher copy of encoder *and*
  head (momentum 0.9); logits ``1/2 [l(X_stu, B_tea) + l(X_tea, B_stu)]``; squared negative term;
  total ``pos + neg + reg``; no inter-volume term, no feature dropout.

Everything is vectorised over volumes, crops and cells (the reference loops in Python).

Deviations from the reference, on purpose:
    * the teacher head (and, for ``original``, the teacher encoder) starts as a copy of the student
      (the reference initialises the Large-Scale teacher head independently) and is updated in
      :meth:`VoCo.on_train_step_end`, after the optimiser step, instead of at the start of every
      forward -- the same sequence of teacher weights from step 2 on, and evaluation passes do not
      move it;
    * the feature dropout zeroes whole sample rows as the reference's ``nn.Dropout1d`` on a 2-D
      input does, but only in training mode (the reference's inline module is active in eval too);
    * random crop origins range over every position inside the region (the reference's centre
      range stops one voxel short of the last position);
    * the encoder embedding is the backbone's pooled token (any backbone), not the concatenation of
      globally pooled Swin stages (SwinUNETR-specific);
    * base crops are augmented like the random crops (``augment_bases``); the papers do not say
      whether the reference's per-crop augmentation touches the bases;
    * ``view_size`` optionally resizes every crop (the CVPR/10k recipe resizes 96^3 crops to 64^3);
      default off, as Large-Scale.

Defaults here are CPU-sized: ``proj_dim=256`` (reference: 1024 Large-Scale, 2048 original).
``objective=voco`` trains on ``data=demo3d_voco`` unless ``data=`` says otherwise (32x96x96 regions ->
3x3 bases of 32^3, patch 8 -> 4^3 tokens per crop; the encoder is built for the 32^3 crops, see
:meth:`VoCo.view_geometry`); the reference geometry is a 64x192x192 region with 64^3 bases.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import Randomizable
from torch import Tensor, nn

from objectives.losses.precision import upcast
from ssl_med.data.channels import MASK_KEY, carry_channel_keys, encoder_channel_kwargs
from ssl_med.encoder import Encoder
from ssl_med.geometry import (
    CropSpec,
    GeometryError,
    ViewGeometry,
    crop_misfit,
    format_size,
    override,
    round_up,
)
from ssl_med.objective import Objective, ObjectiveOutput, Sample
from ssl_med.registry import OBJECTIVES
from ssl_med.train.ema import ema_update

EPS = 1e-6


# ----------------------------------------------------------------------------------------------
# geometry
# ----------------------------------------------------------------------------------------------
def overlap_labels(origins: Tensor, crop_size: Sequence[int], grid: Sequence[int], cell_size: Sequence[int]) -> Tensor:
    """Fraction of each crop's in-plane area that overlaps each grid cell.

    Args:
        origins: ``(K, 2)`` in-plane crop origins ``(row, col)`` in region coordinates.
        crop_size: ``(h, w)`` of the random crops.
        grid: ``(gh, gw)`` base grid; cells are numbered row-major, ``g = r * gw + c``.
        cell_size: ``(ch, cw)`` of a cell (cell ``(r, c)`` spans ``[r ch, (r+1) ch) x [c cw, (c+1) cw)``).

    Returns:
        ``(K, gh * gw)`` float labels in ``[0, 1]``; a row sums to 1 when the crop lies in the grid.
    """
    o = origins.to(torch.float64)
    h, w = crop_size
    gh, gw = grid
    ch, cw = cell_size
    r0 = torch.arange(gh, dtype=torch.float64) * ch
    c0 = torch.arange(gw, dtype=torch.float64) * cw
    dy = (torch.minimum(r0 + ch, o[:, :1] + h) - torch.maximum(r0, o[:, :1])).clamp_min(0)  # (K, gh)
    dx = (torch.minimum(c0 + cw, o[:, 1:] + w) - torch.maximum(c0, o[:, 1:])).clamp_min(0)  # (K, gw)
    return (dy[:, :, None] * dx[:, None, :]).reshape(o.shape[0], gh * gw) / (h * w)


class VoCoViews(Randomizable):
    """Region crop -> base crops, random crops and overlap labels (see the module docstring).

    Input ``{"image": (C, *S)}`` with ``S = (D, H, W)`` or ``(H, W)``. Output::

        bases  (G, C, *s)   G = gh * gw, s = (D, H/gh, W/gw) or (H/gh, W/gw) (or view_size)
        crops  (K, C, *s)
        labels (K, G) float32

    plus the sample's channel keys (``channel_names``, ``channel_mask``, ...: every crop of a region
    has the region's channels, see :mod:`ssl_med.data.channels`).

    Args:
        grid: ``(gh, gw)``.
        num_crops: random crops per region ``K``.
        flip_prob: per spatial axis and crop.
        rot_prob: probability of an in-plane rot90 (k in {1, 2, 3}; k = 2 only for non-square crops).
        shift_prob, shift: additive intensity shift ``U(-shift, shift)`` with this probability.
        augment_bases: augment the base crops too.
        view_size: resize every crop to this size (``None``: keep).
        multiple_of: every crop axis must be a multiple of it (the encoder's patch size).
    """

    def __init__(
        self,
        grid: Sequence[int] = (3, 3),
        num_crops: int = 2,
        flip_prob: float = 0.2,
        rot_prob: float = 0.2,
        shift_prob: float = 0.5,
        shift: float = 0.1,
        augment_bases: bool = True,
        view_size: Sequence[int] | None = None,
        multiple_of: Sequence[int] | None = None,
    ) -> None:
        if len(grid) != 2 or min(grid) < 1 or math.prod(grid) < 2:
            raise GeometryError(
                f"VoCo grid must be two positive ints with at least 2 cells, got {grid}",
                [override("objective.grid", (3, 3))],
            )
        self.grid = tuple(int(g) for g in grid)
        self.num_crops = int(num_crops)
        self.flip_prob, self.rot_prob = flip_prob, rot_prob
        self.shift_prob, self.shift = shift_prob, shift
        self.augment_bases = augment_bases
        self.view_size = tuple(int(v) for v in view_size) if view_size is not None else None
        self.multiple_of = tuple(multiple_of) if multiple_of is not None else None

    def cell_shape(self, spatial: Sequence[int]) -> tuple[int, ...]:
        """Spatial shape ``(*depth, H/gh, W/gw)`` of a base/random crop cut from a region of shape
        ``spatial``, before ``view_size``; a region that does not fit raises a :class:`GeometryError`
        naming the nearest region (``data.crop_size``) or grid that fits."""
        if len(spatial) not in (2, 3):
            raise GeometryError(f"VoCo needs 2D or 3D regions, got spatial shape {tuple(spatial)}")
        *depth, h, w = (int(s) for s in spatial)
        gh, gw = self.grid
        cell = (*depth, h // gh, w // gw)
        patch = tuple(self.multiple_of) if self.multiple_of is not None else (1,) * len(spatial)
        if self.view_size is None:  # the crops go to the encoder as cut: depth and cells in patches
            multiple = (*patch[:-2], gh * patch[-2], gw * patch[-1])
        else:  # the crops are resized to view_size: the grid only has to divide the region
            multiple = (*(1,) * len(depth), gh, gw)
        fit = round_up(spatial, multiple)
        if fit != (*depth, h, w):
            if h % gh or w % gw:
                reason = f"VoCo region in-plane size {(h, w)} is not divisible by the grid {self.grid}"
            else:
                reason = (
                    f"VoCo crops of size {format_size(cell)} (region {format_size(spatial)} / grid {gh}x{gw}) "
                    f"are not multiples of the patch size {format_size(patch)}"
                )
            raise crop_misfit(reason, fit, *self._fitting_grids((*depth, h, w), patch))
        view = self.view_size or cell
        if round_up(view, patch) != tuple(view):
            raise GeometryError(
                f"VoCo view_size {format_size(view)} is not a multiple of the patch size {format_size(patch)}",
                [override("objective.view_size", round_up(view, patch))],
            )
        return cell

    def view_shape(self, spatial: Sequence[int]) -> tuple[int, ...]:
        """Spatial shape of every base and random crop the encoder sees (``view_size`` or the cell)."""
        cell = self.cell_shape(spatial)
        return self.view_size or cell

    def _fitting_grids(self, spatial: Sequence[int], patch: Sequence[int]) -> list[str]:
        """``objective.grid=[g,g]`` for the largest square grid below the current one that fits."""
        if self.view_size is not None or round_up(spatial[:-2], patch[:-2]) != tuple(spatial[:-2]):
            return []
        for g in range(max(self.grid) - 1, 1, -1):
            if all(s % (g * p) == 0 for s, p in zip(spatial[-2:], patch[-2:])):
                return [override("objective.grid", (g, g))]
        return []

    def sample_origins(self, spatial: Sequence[int]) -> np.ndarray:
        """``(K, 2)`` random in-plane origins, uniform over all positions inside the region."""
        h, w = spatial[-2:]
        ch, cw = self.cell_shape(spatial)[-2:]
        rows = self.R.randint(0, h - ch + 1, size=self.num_crops)
        cols = self.R.randint(0, w - cw + 1, size=self.num_crops)
        return np.stack([rows, cols], axis=1)

    def augment(self, x: Tensor, present: Tensor | None = None) -> Tensor:
        """Independent flips / in-plane rot90 / intensity shift of one crop ``(C, *s)``; the shift
        leaves channels that ``present`` ``(C,)`` marks absent at zero."""
        for axis in range(1, x.ndim):
            if self.R.rand() < self.flip_prob:
                x = x.flip(axis)
        if self.R.rand() < self.rot_prob:
            square = x.shape[-1] == x.shape[-2]
            k = int(self.R.randint(1, 4)) if square else 2
            x = torch.rot90(x, k, dims=(x.ndim - 2, x.ndim - 1))
        if self.R.rand() < self.shift_prob:
            shift = float(self.R.uniform(-self.shift, self.shift))
            x = x + (shift if present is None else shift * present.to(x.dtype).view(-1, *(1,) * (x.ndim - 1)))
        return x

    def __call__(self, sample: Sample) -> Sample:
        image = torch.as_tensor(sample["image"], dtype=torch.float32)
        spatial = tuple(image.shape[1:])
        if len(spatial) not in (2, 3):
            raise ValueError(f"VoCo needs (C, H, W) or (C, D, H, W) regions, got {tuple(image.shape)}")
        cell = self.cell_shape(spatial)
        ch, cw = cell[-2:]
        gh, gw = self.grid
        # bases: (C, *depth, gh, ch, gw, cw) -> (G, C, *depth, ch, cw)
        c = image.shape[0]
        depth = spatial[:-2]
        nd = len(depth)
        b = image.reshape(c, *depth, gh, ch, gw, cw)
        perm = (1 + nd, 3 + nd, 0, *range(1, 1 + nd), 2 + nd, 4 + nd)
        bases = b.permute(perm).reshape(gh * gw, c, *cell)
        origins = self.sample_origins(spatial)
        crops = torch.stack([image[..., r : r + ch, q : q + cw] for r, q in origins])
        labels = overlap_labels(torch.from_numpy(origins), (ch, cw), self.grid, (ch, cw)).to(torch.float32)
        present = sample.get(MASK_KEY)
        present = None if present is None else torch.as_tensor(present, dtype=torch.bool)
        crops = torch.stack([self.augment(x, present) for x in crops])
        if self.augment_bases:
            bases = torch.stack([self.augment(x, present) for x in bases])
        if self.view_size is not None and tuple(cell) != self.view_size:
            mode = "trilinear" if nd else "bilinear"
            crops = F.interpolate(crops, size=self.view_size, mode=mode, align_corners=False)
            bases = F.interpolate(bases, size=self.view_size, mode=mode, align_corners=False)
        views = {"bases": bases.contiguous(), "crops": crops.contiguous(), "labels": labels}
        return carry_channel_keys(sample, views)


# ----------------------------------------------------------------------------------------------
# losses (vectorised; tests compare them with plain loops)
# ----------------------------------------------------------------------------------------------
def online_assign(feats: Tensor, bases: Tensor) -> Tensor:
    """``ReLU(cos)`` between every crop and every base: ``(B, K, P), (B, G, P) -> (B, K, G)``."""
    return F.relu(torch.einsum("bkp,bgp->bkg", F.normalize(feats, dim=-1, eps=1e-8), F.normalize(bases, dim=-1, eps=1e-8)))


def position_loss(labels: Tensor, logits: Tensor) -> Tensor:
    """Position-prediction term per volume: ``(B, K, G), (B, K, G) -> (B,)``."""
    pos = -labels * torch.log(1 - (labels - logits).abs() + EPS)
    return pos.sum((1, 2)) / (labels.sum((1, 2)) + EPS)


def negative_loss(labels: Tensor, logits: Tensor, form: Literal["log", "square"] = "log") -> Tensor:
    """Negative term on entries with ``labels == 0`` exactly: ``(B, K, G), (B, K, G) -> (B,)``.

    ``log``: ``-log(1 - l + 1e-6)`` (Large-Scale); ``square``: ``l^2`` (original).
    """
    neg = (labels == 0).to(logits.dtype)
    per = -torch.log(1 - logits + EPS) if form == "log" else logits.pow(2)
    return (neg * per).sum((1, 2)) / (neg.sum((1, 2)) + EPS)


def base_regularisation(bases: Tensor) -> Tensor:
    """``mean_{k<k'} ReLU(cos(b_k, sg(b_k')))^2`` per volume: ``(B, G, P) -> (B,)``."""
    g = bases.shape[1]
    z = F.normalize(bases, dim=-1, eps=1e-8)
    sim = F.relu(torch.einsum("bkp,blp->bkl", z, z.detach())).pow(2)
    upper = torch.triu(torch.ones(g, g, dtype=torch.bool, device=bases.device), diagonal=1)
    return sim[:, upper].mean(dim=1)


def crop_channel_kwargs(
    encoder: nn.Module, batch: Mapping[str, Any], crops: int, bases: int
) -> dict[str, Any]:
    """The channel keywords of ``encoder(x, ...)`` for VoCo's stacked crops of a collated ``batch``.

    ``x`` is ``torch.cat([crops.flatten(0, 1), bases.flatten(0, 1)])``: ``(B K + B G, C, *s)``, sample-major
    within each part (crop ``k`` of sample ``i`` at row ``i K + k``, base ``g`` at ``B K + i G + g``), so
    each sample's entry of :func:`~ssl_med.data.channels.encoder_channel_kwargs` (``channel_names``,
    ``channel_padding_mask`` ``(B, C)``) is repeated ``crops`` times, then ``bases`` times, in that order.
    """
    kwargs = encoder_channel_kwargs(encoder, batch)
    out: dict[str, Any] = {}
    for key, value in kwargs.items():
        if isinstance(value, Tensor):
            out[key] = torch.cat([value.repeat_interleave(crops, 0), value.repeat_interleave(bases, 0)])
        else:
            out[key] = [v for v in value for _ in range(crops)] + [v for v in value for _ in range(bases)]
    return out


class ProjectionHead(nn.Module):
    """``Linear -> BN1d(no affine, batch stats) -> ReLU`` x2 ``-> Linear``: ``(n, D) -> (n, out_dim)``."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(in_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim, affine=False, track_running_stats=False),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, hidden_dim),
            nn.BatchNorm1d(hidden_dim, affine=False, track_running_stats=False),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_dim, out_dim),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)


def row_dropout(x: Tensor, p: float, training: bool) -> Tensor:
    """Zero whole rows of ``(n, D)`` with probability ``p`` and scale the rest by ``1/(1-p)``."""
    if not training or p <= 0:
        return x
    keep = (torch.rand(x.shape[0], 1, device=x.device) >= p).to(x.dtype)
    return x * keep / (1 - p)


@OBJECTIVES.register("voco")
class VoCo(Objective):
    """VoCo objective (see the module docstring).

    Args:
        encoder: any encoder; crops are encoded through ``encoder(x).pooled``.
        version: ``large_scale`` (TPAMI, default) or ``original`` (public VoCo repo).
        grid: base grid ``(gh, gw)`` over the region's in-plane axes (reference: 3x3 Large-Scale,
            4x4 original).
        num_crops: random crops per region (reference: 2).
        proj_hidden_dim, proj_dim: projection head widths (reference: 1024/1024, original 2048/2048).
        momentum: EMA momentum of the teacher (reference: 0.9, constant).
        feature_dropout: row dropout before the student head (Large-Scale: 0.2; unused by original).
        inter_weight, reg_weight: weights of the inter-volume term and the base regulariser (1, 1).
        view_size: optional resize of every crop (original: 64^3 from 96^3 crops).
        views: the per-crop augmentation, keyword arguments of :class:`VoCoViews` (``flip_prob``,
            ``rot_prob``, ``shift_prob``, ``shift``, ``augment_bases``; reference Large-Scale 0.2, 0.2,
            0.5, 0.1, bases augmented; original ``shift_prob`` 0.1); missing ones take its defaults. On
            the command line: ``objective.views.shift_prob=0.1``. The grid, crop count and view size
            are the objective's own options: the loss and the start-up geometry read them too.
    """

    def __init__(
        self,
        encoder: Encoder,
        version: Literal["large_scale", "original"] = "large_scale",
        grid: Sequence[int] = (3, 3),
        num_crops: int = 2,
        proj_hidden_dim: int = 256,
        proj_dim: int = 256,
        momentum: float = 0.9,
        feature_dropout: float = 0.2,
        inter_weight: float = 1.0,
        reg_weight: float = 1.0,
        view_size: Sequence[int] | None = None,
        views: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(encoder)
        if version not in ("large_scale", "original"):
            raise ValueError(f"version must be 'large_scale' or 'original', got {version!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1), got {momentum}")
        self.version = version
        self.grid = tuple(int(g) for g in grid)
        self.num_crops = num_crops
        self.momentum = momentum
        self.feature_dropout = feature_dropout
        self.inter_weight, self.reg_weight = inter_weight, reg_weight
        self.views = VoCoViews(
            grid=self.grid,
            num_crops=num_crops,
            view_size=tuple(view_size) if view_size is not None else None,
            multiple_of=encoder.patch_size,
            **(views or {}),
        )
        self.student_head = ProjectionHead(encoder.embed_dim, proj_hidden_dim, proj_dim)
        self.teacher_head = copy.deepcopy(self.student_head).requires_grad_(False)
        # the original version keeps a full EMA teacher network (eval_encoder: what the online curve reads and a
        # run exports; ``ssl_med export weights=student`` gives the trained encoder)
        self.teacher_encoder: nn.Module | None = None
        if version == "original":
            self.teacher_encoder = copy.deepcopy(encoder).requires_grad_(False)

    def view_transform(self) -> Callable[[Sample], Sample]:
        return self.views

    @classmethod
    def view_geometry(cls, crop: CropSpec, options: Mapping[str, Any]) -> ViewGeometry:
        """The data crop is the region ``(*depth, H, W)``; the encoder sees base and random crops of
        ``(*depth, H/gh, W/gw)`` (or ``view_size``), so ``backbone.img_size`` is that, not the region."""
        o = cls.options_with_defaults(options)
        views = VoCoViews(grid=o["grid"], view_size=o["view_size"], multiple_of=crop.patch_size)
        size = views.view_shape(crop.crop_size)
        return ViewGeometry(size, {"bases": size, "crops": size})

    def eval_encoder(self) -> nn.Module:
        return self.teacher_encoder if self.teacher_encoder is not None else self.encoder

    def on_train_step_end(self, step: int, max_steps: int) -> None:
        ema_update(self.teacher_head, self.student_head, self.momentum, copy_buffers=True)
        if self.teacher_encoder is not None:
            ema_update(self.teacher_encoder, self.encoder, self.momentum, copy_buffers=True)

    def losses(
        self, labels: Tensor, x_stu: Tensor, b_stu: Tensor, x_tea: Tensor, b_tea: Tensor
    ) -> dict[str, Tensor]:
        """Per-volume loss terms ``(B,)`` from projected embeddings.

        Args:
            labels: ``(B, K, G)``.
            x_stu, x_tea: ``(B, K, P)`` student / teacher projections of the random crops.
            b_stu, b_tea: ``(B, G, P)`` student / teacher projections of the bases.
        """
        terms: dict[str, Tensor] = {}
        if self.version == "large_scale":
            logits = online_assign(x_stu, b_tea)
            terms["pos"] = position_loss(labels, logits)
            terms["neg"] = negative_loss(labels, logits, "log")
            b_stu_j, b_tea_j = b_stu.roll(-1, dims=0), b_tea.roll(-1, dims=0)  # volume j = (i + 1) mod B
            target = online_assign(x_tea, b_tea_j).detach()
            pred = online_assign(x_stu, b_stu_j)
            terms["inter"] = position_loss(target, pred) + negative_loss(target, pred, "log")
        else:
            logits = 0.5 * (online_assign(x_stu, b_tea) + online_assign(x_tea, b_stu))
            terms["pos"] = position_loss(labels, logits)
            terms["neg"] = negative_loss(labels, logits, "square")
        terms["reg"] = base_regularisation(b_stu)
        return terms

    def forward(self, batch: dict[str, Any]) -> ObjectiveOutput:
        """One step on ``bases (B, G, C, *s)``, ``crops (B, K, C, *s)``, ``labels (B, K, G)`` (and the
        batch's channel keys, which a channel-adaptive encoder gets with every crop:
        :func:`crop_channel_kwargs`)."""
        bases, crops, labels = batch["bases"], batch["crops"], batch["labels"]
        b, g = bases.shape[:2]
        k = crops.shape[1]
        inputs = torch.cat([crops.flatten(0, 1), bases.flatten(0, 1)])  # (B K + B G, C, *s)
        channels = crop_channel_kwargs(self.encoder, batch, k, g)
        emb = self.encoder(inputs, **channels).pooled
        if self.version == "large_scale":
            student = self.student_head(row_dropout(emb, self.feature_dropout, self.training))
            with torch.no_grad():
                teacher = self.teacher_head(emb.detach())
        else:
            student = self.student_head(emb)
            assert self.teacher_encoder is not None
            with torch.no_grad():
                teacher = self.teacher_head(self.teacher_encoder(inputs, **channels).pooled)
        x_stu, b_stu = student[: b * k].reshape(b, k, -1), student[b * k :].reshape(b, g, -1)
        x_tea, b_tea = teacher[: b * k].reshape(b, k, -1), teacher[b * k :].reshape(b, g, -1)
        # the terms in float32 outside autocast: a bf16 einsum rounds cosines near 1 to 1 (bf16 steps
        # are 2^-8 there), which -log(1 - l + 1e-6) turns into ~14 instead of a few units
        with torch.autocast(device_type=student.device.type, enabled=False):
            x_stu, b_stu, x_tea, b_tea = upcast(x_stu), upcast(b_stu), upcast(x_tea), upcast(b_tea)
            terms = self.losses(labels.to(x_stu.dtype), x_stu, b_stu, x_tea, b_tea)
            with torch.no_grad():
                label_mae = (online_assign(x_stu, b_tea) - labels).abs().mean()
        per_volume = terms["pos"] + terms["neg"] + self.reg_weight * terms["reg"]
        if "inter" in terms:
            per_volume = per_volume + self.inter_weight * terms["inter"]
        loss = per_volume.mean()
        logged = {name: t.mean().detach() for name, t in terms.items()}
        logged["label_mae"] = label_mae
        embeddings = emb[: b * k].reshape(b, k, -1)[:, 0].detach()
        return ObjectiveOutput(loss=loss, terms=logged, embeddings=embeddings)

    @torch.no_grad()
    def preview(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        bases, crops = batch["bases"], batch["crops"]
        return {"random_crop": crops[:, 0], "base_first": bases[:, 0], "base_last": bases[:, -1]}
