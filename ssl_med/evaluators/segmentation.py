"""Segmentation transfer (``eval=segmentation``): UNETR decoder, ``frozen`` or ``finetune`` encoder,
on all channels or a subset of named sequences (``eval.channels``, ``eval.channel_subsets``).

Training samples random ``roi_size`` crops from the training items (a ``pos_fraction`` of them
centred on a random foreground voxel), MONAI ``DiceCELoss`` (softmax, one-hot targets), AdamW with a
cosine schedule; in ``finetune`` mode the encoder trains too with layer-wise LR decay. Validation
and test use MONAI ``sliding_window_inference`` over whole items; the checkpoint with the best
validation mean Dice is scored once on test (Dice per foreground class + mean, MONAI
``DiceMetric``). After ``finetune`` the weight-interpolation curve (pretrained <-> fine-tuned
encoder, ``interpolation.alphas``) is measured on the test split and, optionally, by a linear probe
of a second dataset.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch
from torch import Tensor

from ssl_med.encoder import Encoder
from ssl_med.evaluators.base import EvalContext, EvalResult, layer_decay_groups
from ssl_med.evaluators.channels import evaluate_channels
from ssl_med.evaluators.datasets import SegmentationData
from ssl_med.evaluators.metrics import dice_per_class
from ssl_med.evaluators.plots import interpolation_plot, overlay_png
from ssl_med.evaluators.unetr import UnetrSegmenter
from ssl_med.registry import EVALUATORS
from ssl_med.train.schedules import cosine_schedule


def _pad_to(image: np.ndarray, label: np.ndarray, roi: list[int]) -> tuple[np.ndarray, np.ndarray]:
    pads = [(0, max(r - s, 0)) for r, s in zip(roi, label.shape)]
    if not any(p[1] for p in pads):
        return image, label
    return np.pad(image, [(0, 0), *pads]), np.pad(label, pads)


def sample_crops(
    items: list[tuple[np.ndarray, np.ndarray]],
    roi: list[int],
    batch: int,
    rng: np.random.Generator,
    pos_fraction: float,
) -> tuple[Tensor, Tensor]:
    """``batch`` random crops: images ``(B, C, *roi)`` float32 and labels ``(B, *roi)`` int64."""
    xs, ys = [], []
    for _ in range(batch):
        image, label = _pad_to(*items[rng.integers(len(items))], roi)
        fg = np.argwhere(label > 0) if rng.random() < pos_fraction else np.empty((0, label.ndim))
        if len(fg):
            centre = fg[rng.integers(len(fg))]
            start = [int(np.clip(c - r // 2, 0, s - r)) for c, r, s in zip(centre, roi, label.shape)]
        else:
            start = [int(rng.integers(s - r + 1)) for r, s in zip(roi, label.shape)]
        sl = tuple(slice(a, a + r) for a, r in zip(start, roi))
        xs.append(image[(slice(None), *sl)])
        ys.append(label[sl])
    return torch.from_numpy(np.stack(xs)).float(), torch.from_numpy(np.stack(ys)).long()


@torch.no_grad()
def predict_items(
    model: torch.nn.Module, items: list[tuple[np.ndarray, np.ndarray]], cfg: dict[str, Any], device: str
) -> list[np.ndarray]:
    """Sliding-window argmax maps, one ``(*S)`` int64 array per item."""
    from monai.inferers import sliding_window_inference

    model.eval()
    preds = []
    for image, _ in items:
        x = torch.from_numpy(image)[None].float().to(device)
        logits = sliding_window_inference(
            x,
            list(cfg["roi_size"]),
            int(cfg["sw_batch_size"]),
            model,
            overlap=float(cfg["sw_overlap"]),
            mode="gaussian",
        )
        preds.append(logits.argmax(dim=1)[0].cpu().numpy())
    return preds


def score_items(
    preds: list[np.ndarray], items: list[tuple[np.ndarray, np.ndarray]], num_classes: int
) -> np.ndarray:
    """Foreground Dice per class ``(num_classes - 1,)``: over the stacked items when they share a shape
    (2D slices of one volume -> one global Dice), else the mean over items."""
    labels = [lab for _, lab in items]
    if len({p.shape for p in preds}) == 1:
        return dice_per_class(
            torch.from_numpy(np.stack(preds))[None], torch.from_numpy(np.stack(labels))[None], num_classes
        )
    per_item = [
        dice_per_class(torch.from_numpy(p)[None], torch.from_numpy(y)[None], num_classes)
        for p, y in zip(preds, labels)
    ]
    return np.nanmean(np.stack(per_item), axis=0)


def _dice_metrics(dice: np.ndarray, class_names: list[str]) -> dict[str, float]:
    out = {f"dice/{name}": float(v) for name, v in zip(class_names, dice)}
    out["dice_mean"] = float(np.nanmean(dice)) if np.isfinite(dice).any() else float("nan")
    return out


def build_optimizer(model: UnetrSegmenter, cfg: dict[str, Any]) -> torch.optim.Optimizer:
    """AdamW: decoder at ``lr``; in finetune mode the encoder at ``lr * encoder_lr_scale`` with layer decay."""
    encoder_ids = {id(p) for p in model.encoder.parameters()}
    decoder = [p for p in model.parameters() if id(p) not in encoder_ids and p.requires_grad]
    groups: list[dict[str, Any]] = [{"params": decoder, "lr": cfg["lr"], "weight_decay": cfg["weight_decay"]}]
    if not model.frozen:
        groups += layer_decay_groups(
            model.encoder, cfg["lr"] * cfg["encoder_lr_scale"], cfg["layer_decay"], cfg["weight_decay"]
        )
    return torch.optim.AdamW(groups)


def train_segmenter(
    model: UnetrSegmenter, data: SegmentationData, cfg: dict[str, Any], ctx: EvalContext
) -> dict[str, Any]:
    """Train in place, keep the best-validation weights; returns ``{"history": [...], "best_val_dice": x}``."""
    from monai.losses import DiceCELoss

    torch.manual_seed(ctx.seed)
    rng = np.random.default_rng(ctx.seed)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True, include_background=False)
    optimizer = build_optimizer(model, cfg)
    steps = int(cfg["steps"])
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_schedule(s, steps, 1.0, 0.0)
    )
    history: list[dict[str, float]] = []
    best_state, best_dice = None, -math.inf
    for step in range(1, steps + 1):
        model.train()
        x, y = sample_crops(
            data.items["train"],
            list(cfg["roi_size"]),
            int(cfg["batch_size"]),
            rng,
            float(cfg["pos_fraction"]),
        )
        loss = loss_fn(model(x.to(ctx.device)), y[:, None].to(ctx.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        record = {"step": step, "loss": loss.item()}
        if step % int(cfg["eval_every"]) == 0 or step == steps:
            dice = score_items(
                predict_items(model, data.items["val"], cfg, ctx.device), data.items["val"], data.num_classes
            )
            record["val_dice_mean"] = float(np.nanmean(dice)) if np.isfinite(dice).any() else 0.0
            if record["val_dice_mean"] > best_dice:
                best_dice = record["val_dice_mean"]
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        history.append(record)
    if best_state is not None:
        model.load_state_dict(best_state)
    return {"history": history, "best_val_dice": best_dice}


def interpolation_curve(
    model: UnetrSegmenter,
    pretrained: dict[str, Tensor],
    data: SegmentationData,
    cfg: dict[str, Any],
    ctx: EvalContext,
) -> list[dict[str, float]]:
    """Test Dice (and the second-dataset probe AUROC) of encoders ``(1 - a) * pretrained + a * finetuned``."""
    finetuned = {k: v.detach().clone() for k, v in model.encoder.state_dict().items()}
    probe_cfg = cfg["interpolation"].get("probe_data")
    probe_data = None
    if probe_cfg:
        from ssl_med.evaluators.datasets import eval_data_config, load_eval_data

        if isinstance(probe_cfg, str):
            probe_cfg = eval_data_config(probe_cfg)
        probe_data = load_eval_data(probe_cfg, model.encoder.in_chans or 1)
    curve = []
    for alpha in cfg["interpolation"]["alphas"]:
        mixed = {
            k: (1 - alpha) * pretrained[k] + alpha * finetuned[k]
            if finetuned[k].is_floating_point()
            else finetuned[k]
            for k in finetuned
        }
        model.encoder.load_state_dict(mixed)
        dice = score_items(
            predict_items(model, data.items["test"], cfg, ctx.device), data.items["test"], data.num_classes
        )
        point = {"alpha": float(alpha), **_dice_metrics(dice, data.class_names)}
        if probe_data is not None:
            from ssl_med.evaluators.features import cached_features
            from ssl_med.evaluators.linear_probe import probe_sweep

            feats = cached_features(
                model.encoder, probe_data.images, "interp", "pooled", None, 64, ctx.device
            )
            probe = probe_sweep(feats, probe_data.labels, probe_data.task, [0.01, 0.1, 1.0])["test"]
            point["probe_auroc"] = probe["auroc"]
        curve.append(point)
    model.encoder.load_state_dict(finetuned)
    return curve


@EVALUATORS.register("segmentation")
def segmentation(
    encoder: Encoder, cfg: dict[str, Any], data: SegmentationData, ctx: EvalContext
) -> EvalResult:
    """Train a UNETR decoder on ``data`` over a copy of ``encoder``; test Dice per class + mean.

    ``eval.channels``: only these sequences (by name; absent ones are zero-filled in the images, left out
    of the tokens of encoders with one token per (sequence, patch) — ChAda-ViT, the per-modality ViT — and
    seen as zeros by fused-channel encoders; :mod:`ssl_med.evaluators.channels`).
    ``eval.channel_subsets``: one decoder trained and tested per subset; the metrics of subset ``s``
    are ``<s>/dice_mean`` and ``<s>/dice/<class>``, the headline ``dice_mean`` is the first subset's,
    and ``details["subsets"]`` is the table, one row per subset
    (:func:`~ssl_med.evaluators.channels.evaluate_channels`)."""
    if not isinstance(data, SegmentationData):
        raise TypeError(
            "segmentation needs a segmentation dataset (eval_data=brats, brats2d, kvasir, mni152_tissue)"
        )
    if data.spatial_dims != encoder.spatial_dims:
        raise ValueError(f"{data.name} is {data.spatial_dims}D but the encoder is {encoder.spatial_dims}D")
    mode = cfg["mode"]
    if mode not in ("frozen", "finetune"):
        raise ValueError(f"eval.mode must be frozen or finetune, got {mode!r}")
    return evaluate_channels(
        _segment, encoder, cfg, data, ctx, subset_cfg={"overlays": 0}, row_details=("best_val_dice",)
    )


def _segment(encoder: Encoder, cfg: dict[str, Any], data: SegmentationData, ctx: EvalContext) -> EvalResult:
    """One segmentation transfer of ``encoder`` on ``data`` (see :func:`segmentation`)."""
    mode = cfg["mode"]
    torch.manual_seed(ctx.seed)
    pretrained = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    model = UnetrSegmenter(
        copy.deepcopy(encoder),
        data.num_classes,
        int(cfg["feature_size"]),
        cfg.get("layers"),
        frozen=mode == "frozen",
    ).to(ctx.device)
    trained = train_segmenter(model, data, cfg, ctx)
    preds = predict_items(model, data.items["test"], cfg, ctx.device)
    metrics = _dice_metrics(score_items(preds, data.items["test"], data.num_classes), data.class_names)
    details: dict[str, Any] = {"mode": mode, "layers": model.layers, **trained}
    for i in range(min(int(cfg["overlays"]), len(preds))):
        image, truth = data.items["test"][i]
        path = ctx.out_dir / "overlays" / f"{data.name}_{ctx.encoder_label}_{i}.png"
        overlay_png(
            image, truth, preds[i], data.num_classes, path, f"{data.name} {ctx.encoder_label} ({mode})"
        )
    if mode == "finetune" and cfg["interpolation"].get("alphas"):
        curve = interpolation_curve(model, pretrained, data, cfg, ctx)
        details["interpolation"] = curve
        interpolation_plot(curve, ctx.out_dir / f"interpolation_{ctx.encoder_label}.png")
    return EvalResult(metrics=metrics, details=details)
