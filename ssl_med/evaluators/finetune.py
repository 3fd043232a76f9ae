"""Short end-to-end fine-tune (``eval=finetune``): the fine-tune column of the classification table.

Encoder + linear head on a read-out of the encoder (``eval.features``: ``auto`` is the pretraining
objective's, the mean patch token for MAE-family encoders as in MAE's fine-tuning recipe, whose CLS token
no loss trains; the pooled embedding otherwise), AdamW with layer-wise LR decay and a cosine schedule,
cross-entropy (BCE for multi-label), for a fixed budget of ``steps`` (the same for every encoder).
Augmentation: random flips along every spatial axis. ``head_norm=batchnorm`` (the config's default) puts an
affine-free ``BatchNorm1d`` in front of the head: a ViT's read-out carries its label in directions of small
spread beside a large shared one, and a near-zero head on the raw read-out does not reach them within a short
budget (it predicts the majority class; :func:`warn_if_one_class` names such weights in the log).

``lr``, ``layer_decay`` and ``features`` may be lists: every combination is fine-tuned and the weights with
the best validation ``select_metric`` (checked every ``eval_every`` steps, over all of them) are scored
once on test; within a run, a later check replaces the kept weights only when its val score is ahead by more than
``select_min_gain`` (default 0: any gain), so that a difference below val's resolution keeps the weights with
fewer fine-tuning steps. A pretrained encoder is usually fine-tuned with a decayed, small encoder LR (BEiT/MAE:
layer decay 0.65–0.75) and a network trained from scratch with one LR for every layer (layer decay 1.0);
giving both settings to both rows and choosing on val keeps the random-init row from being judged by a
recipe that suits only pretrained weights. A read-out list does the same for the head's input, as the
linear probe's does (DINOv2's linear evaluation keeps the read-out best on val).

``head_init=probe`` starts every fine-tune from a linear probe instead of a near-zero head (LP-FT: Kumar
et al., "Fine-Tuning can Distort Pretrained Features and Underperform Out-of-Distribution", ICLR 2022): a
logistic regression on the frozen read-out of train (standardised; read-out among ``features`` and ``C``
among ``head_probe_C`` chosen together on val) is folded into the head, so the first gradient steps do not
have to undo a random head's pull on the encoder. The fine-tune then trains through the probe's read-out.
Folded into the linear weights, the probe's standardisation multiplies every change of a low-spread feature by
1/std and the first steps diverge; ``head_norm=batchnorm`` keeps it in an affine-free ``BatchNorm1d`` in front of
the head instead (MAE's linear-probe head), whose statistics are recomputed on the train images before each val
check (:func:`refresh_head_norm`). ``eval=lpft`` is that recipe: BatchNorm head, the head at the encoder's LR,
warm-up, small encoder LRs.
"""

from __future__ import annotations

import copy
import itertools
import logging
import math
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_med.encoder import Encoder
from ssl_med.evaluators.base import EvalContext, EvalResult, layer_decay_groups
from ssl_med.evaluators.channels import evaluate_channels
from ssl_med.evaluators.datasets import ClassificationData
from ssl_med.evaluators.features import READOUTS, extract_readouts
from ssl_med.evaluators.linear_probe import fit_logistic
from ssl_med.evaluators.metrics import classification_metrics
from ssl_med.evaluators.readout import fit_on_val
from ssl_med.registry import EVALUATORS
from ssl_med.train.schedules import steps_of, warmup_cosine

log = logging.getLogger(__name__)

#: read-outs a head can be trained through, with their width in multiples of the embedding dim
HEAD_READOUTS = {"pooled": 1, "mean_patch": 1, "pooled+mean_patch": 2}


#: ``eval.head_norm``: what standardises the read-out in front of the linear head
HEAD_NORMS = ("none", "batchnorm")


class Classifier(nn.Module):
    """``encoder`` + (optional feature norm) + ``nn.Linear`` on one read-out of it: ``(B, C, *S)`` -> ``(B, K)``.

    Args:
        encoder: the encoder (trained end to end).
        num_outputs: ``K``, classes (labels for multi-label).
        readout: ``pooled`` (the encoder's pooled embedding, ``(B, D)``), ``mean_patch`` (the mean patch
            token, ``(B, D)``) or ``pooled+mean_patch`` (both, ``(B, 2D)``).
        head_norm: ``none``, or ``batchnorm``: a ``BatchNorm1d`` without affine parameters in front of the
            linear layer (MAE's linear-probe head), which keeps re-standardising the read-out while
            fine-tuning moves it, so a head fitted on standardised features keeps seeing them.
    """

    def __init__(self, encoder: Encoder, num_outputs: int, readout: str = "pooled", head_norm: str = "none") -> None:
        super().__init__()
        if readout not in HEAD_READOUTS:
            raise ValueError(f"eval.features={readout!r} cannot be fine-tuned through; choose from {sorted(HEAD_READOUTS)}")
        if head_norm not in HEAD_NORMS:
            raise ValueError(f"eval.head_norm={head_norm!r}; choose from {list(HEAD_NORMS)}")
        self.encoder = encoder
        self.readout = readout
        width = encoder.embed_dim * HEAD_READOUTS[readout]
        self.norm = nn.BatchNorm1d(width, affine=False) if head_norm == "batchnorm" else nn.Identity()
        self.head = nn.Linear(width, num_outputs)
        nn.init.zeros_(self.head.bias)
        nn.init.trunc_normal_(self.head.weight, std=0.01)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(READOUTS[self.readout](self.encoder(x))))


def set_standardisation(norm: nn.BatchNorm1d, mean: Tensor, std: Tensor) -> None:
    """Running statistics of ``norm`` such that eval mode computes ``(x - mean) / std`` exactly,
    ``(x - mu) / sqrt(var + eps)`` (``std == 0``: 1, as scikit-learn's ``StandardScaler``)."""
    std = torch.where(std > 0, std, torch.ones_like(std))
    norm.running_mean.copy_(mean)
    norm.running_var.copy_((std.double() ** 2 - norm.eps).clamp_min(0.0))


@torch.no_grad()
def refresh_head_norm(model: Classifier, images: Tensor, batch_size: int, device: str, generator: torch.Generator) -> None:
    """Set the head's ``BatchNorm1d`` (``head_norm=batchnorm``; no-op otherwise) to the standardisation of
    the read-out of the train ``images`` under the encoder as it is now, each image flipped as training
    flips them (every spatial axis with probability 1/2, drawn from ``generator``), so the statistics are
    those of the distribution the head is trained on: "precise BN" (Wu & Johnson, "Rethinking 'Batch' in
    BatchNorm", 2021). The running averages of the last training batches lag an encoder that fine-tuning
    keeps moving and are noisy at batch 32: a shift of them shifts every logit alike, which leaves AUROC
    alone but can put every test argmax in one class."""
    if not isinstance(model.norm, nn.BatchNorm1d):
        return
    model.eval()
    feats = []
    for start in range(0, len(images), batch_size):
        batch = _random_flips(images[start : start + batch_size], generator, per_sample=True)
        feats.append(READOUTS[model.readout](model.encoder(batch.to(device))).double())
    feats = torch.cat(feats)
    set_standardisation(model.norm, feats.mean(0), feats.std(0, unbiased=False))


def select_min_gain(cfg: dict[str, Any]) -> float:
    """``eval.select_min_gain`` (``null``: 0); a negative margin is refused."""
    gain = float(cfg.get("select_min_gain") or 0.0)
    if gain < 0:
        raise ValueError(f"eval.select_min_gain must be >= 0 (a val gain a later check needs), got {gain}")
    return gain


def _random_flips(x: Tensor, generator: torch.Generator, per_sample: bool = False) -> Tensor:
    """``x`` ``(B, C, *S)`` flipped along each spatial axis with probability 1/2: the whole batch alike (training),
    or each sample on its own draw (``per_sample``: the precise-BN statistics of :func:`refresh_head_norm`)."""
    for axis in range(2, x.ndim):
        if per_sample:
            flip = (torch.rand(len(x), generator=generator) < 0.5).view(-1, *[1] * (x.ndim - 1))
            x = torch.where(flip, x.flip(axis), x)
        elif torch.rand((), generator=generator) < 0.5:
            x = x.flip(axis)
    return x


def _as_list(value: Any) -> list[float]:
    return [float(v) for v in value] if isinstance(value, Iterable) and not isinstance(value, str) else [float(value)]


@torch.no_grad()
def predict(model: nn.Module, images: Tensor, task: str, batch_size: int, device: str) -> np.ndarray:
    """Probabilities ``(N, K)`` (softmax; sigmoid for multi-label)."""
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        logits = model(images[start : start + batch_size].to(device)).float()
        out.append((logits.sigmoid() if task == "multi-label" else logits.softmax(dim=1)).cpu())
    return torch.cat(out).numpy()


def _probe_weights(model: Any, task: str, num_outputs: int) -> tuple[np.ndarray, np.ndarray]:
    """A fitted sklearn logistic regression -> head weights ``(K, D)`` and bias ``(K,)`` giving the same
    probabilities under the head's softmax (sigmoid for multi-label)."""
    if task == "multi-label":
        coef = np.concatenate([m.coef_ for m in model.estimators_])
        bias = np.concatenate([m.intercept_ for m in model.estimators_])
    elif model.coef_.shape[0] == 1:  # two classes: softmax over (0, z) is sigmoid(z)
        coef = np.concatenate([np.zeros_like(model.coef_), model.coef_])
        bias = np.concatenate([np.zeros(1), model.intercept_])
    else:
        coef, bias = model.coef_, model.intercept_
    if coef.shape[0] != num_outputs:
        raise ValueError(f"the probe has {coef.shape[0]} outputs, the head {num_outputs}: a class is missing from train")
    return coef, bias


def head_readouts(cfg: dict[str, Any]) -> list[str]:
    """``cfg['features']`` (one read-out or a list; ``auto`` already resolved) as a checked list."""
    features = cfg.get("features") or "pooled"
    readouts = [features] if isinstance(features, str) else list(features)
    unknown = [r for r in readouts if r not in HEAD_READOUTS]
    if unknown or not readouts:
        raise ValueError(f"eval.features={features!r} cannot be fine-tuned through; choose from {sorted(HEAD_READOUTS)}")
    return readouts


@torch.no_grad()
def probe_head(
    encoder: Encoder, data: ClassificationData, cfg: dict[str, Any], device: str, readouts: Sequence[str]
) -> tuple[Classifier, float]:
    """A :class:`Classifier` on ``encoder`` whose head is a logistic-regression probe of the frozen read-out
    (LP-FT). One probe per read-out in ``readouts`` and ``C`` in ``cfg['head_probe_C']`` is fitted on
    standardised train features; the (read-out, ``C``) best on val is kept. Its standardisation goes into
    the head's ``BatchNorm1d`` running statistics (``cfg['head_norm'] == 'batchnorm'``) or is folded into the
    linear weights (``none``). Returns the classifier (its ``readout`` is the chosen one) and the chosen ``C``."""
    by_split = {s: extract_readouts(encoder, data.images[s], readouts, cfg["eval_batch_size"], device) for s in ("train", "val")}
    max_iter = int(cfg.get("head_probe_max_iter", 1000))
    best = fit_on_val(
        {m: {s: by_split[s][m] for s in by_split} for m in readouts}, data.labels, data.task,
        _as_list(cfg.get("head_probe_C", [1.0])), cfg["select_metric"],
        lambda x, y, c: fit_logistic(x, y, c, data.task, max_iter),
    )
    model = Classifier(encoder, data.num_classes, best.mode, cfg.get("head_norm", "none"))
    coef, bias = _probe_weights(best.model, data.task, model.head.out_features)
    if isinstance(model.norm, nn.BatchNorm1d):
        set_standardisation(model.norm, torch.as_tensor(best.scaler.mean_), torch.as_tensor(best.scaler.scale_))
        weight = coef
    else:
        weight = coef / np.where(best.scaler.scale_ > 0, best.scaler.scale_, 1.0)  # w.(x - mu)/sd + b = (w/sd).x + b - (w/sd).mu
        bias = bias - weight @ best.scaler.mean_
    model.head.weight.copy_(torch.as_tensor(weight, dtype=model.head.weight.dtype))
    model.head.bias.copy_(torch.as_tensor(bias, dtype=model.head.bias.dtype))
    return model, best.C


def finetune_optimizer(
    model: Classifier, cfg: dict[str, Any], lr: float, layer_decay: float
) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over ``model`` (encoder blocks at ``lr * layer_decay^(depth - i)``, the head at ``cfg['head_lr']``,
    or at ``lr`` when that is null) and its per-step schedule: linear warm-up over ``cfg['warmup']`` (steps,
    or a fraction of ``cfg['steps']``), then half-cosine to 0 at the last step."""
    groups = layer_decay_groups(model.encoder, lr, layer_decay, cfg["weight_decay"])
    head_lr = lr if cfg.get("head_lr") is None else float(cfg["head_lr"])
    groups.append({"params": list(model.head.parameters()), "lr": head_lr, "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups)
    steps = int(cfg["steps"])
    warmup = steps_of(float(cfg.get("warmup", 0.0)), steps)
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: warmup_cosine(s, steps, 1.0, 0.0, warmup))


def finetune_once(
    encoder: Encoder, cfg: dict[str, Any], data: ClassificationData, ctx: EvalContext, lr: float, layer_decay: float,
    readout: str, head_state: dict[str, dict[str, Tensor]] | None = None,
) -> tuple[float, int, dict[str, Tensor], list[dict[str, float]]]:
    """Fine-tune a copy of ``encoder`` through ``readout`` at one (``lr``, ``layer_decay``), from ``head_state`` when given
    (the LP-FT head); returns the best val score, the step and weights that reached it, and the val history. Val is
    checked every ``eval_every`` steps, at the last step and, from an LP-FT head, before the first step
    (the probe itself; history step 0), so an LP-FT fine-tune is never chosen below its own probe on val. A check
    replaces the kept weights only when it is ahead of them by more than ``select_min_gain``."""
    torch.manual_seed(ctx.seed)
    generator = torch.Generator().manual_seed(ctx.seed)
    model = Classifier(copy.deepcopy(encoder), data.num_classes, readout, cfg.get("head_norm", "none")).to(ctx.device)
    if head_state is not None:
        model.norm.load_state_dict(head_state["norm"])
        model.head.load_state_dict(head_state["head"])
    steps = int(cfg["steps"])
    optimizer, schedule = finetune_optimizer(model, cfg, lr, layer_decay)
    x_train, y_train = data.images["train"], torch.from_numpy(data.labels["train"])
    best_state, best_score, best_step, history = copy.deepcopy(model.state_dict()), -math.inf, 0, []
    min_gain = select_min_gain(cfg)

    def check(step: int, loss: float) -> None:
        nonlocal best_score, best_state, best_step
        if step > 0:  # at step 0 the head's statistics are the probe's
            refresh_head_norm(model, x_train, cfg["eval_batch_size"], ctx.device, torch.Generator().manual_seed(ctx.seed))
        scores = predict(model, data.images["val"], data.task, cfg["eval_batch_size"], ctx.device)
        val = classification_metrics(scores, data.labels["val"], data.task)
        history.append({"step": step, "loss": loss, **{f"val_{k}": v for k, v in val.items() if "/" not in k}})
        score = val[cfg["select_metric"]]
        if not math.isfinite(score):
            score = val["accuracy"]
        log.info(
            "finetune [%s] %s lr=%g layer_decay=%g step %d/%d: loss %.4f, val %s %.4f",
            ctx.encoder_label, readout, lr, layer_decay, step, steps, loss, cfg["select_metric"], score,
        )
        if score > best_score + min_gain:  # near-ties keep the earlier weights (under LP-FT, the probe)
            best_score, best_state, best_step = score, copy.deepcopy(model.state_dict()), step

    if head_state is not None:  # the LP-FT start (the probe itself) is a candidate: 0 steps of fine-tuning
        check(0, float("nan"))
    for step in range(1, steps + 1):
        model.train()
        idx = torch.randint(len(x_train), (int(cfg["batch_size"]),), generator=generator)
        logits = model(_random_flips(x_train[idx], generator).to(ctx.device))
        y = y_train[idx].to(ctx.device)
        loss = (
            F.binary_cross_entropy_with_logits(logits, y.float())
            if data.task == "multi-label"
            else F.cross_entropy(logits, y)
        )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step % int(cfg["eval_every"]) == 0 or step == steps:
            check(step, loss.item())
    return best_score, best_step, best_state, history


@EVALUATORS.register("finetune")
def finetune(encoder: Encoder, cfg: dict[str, Any], data: ClassificationData, ctx: EvalContext) -> EvalResult:
    """Fine-tune copies of ``encoder`` end to end over the (``features`` × ``lr`` × ``layer_decay``) grid (one
    read-out, the probe's, under ``head_init=probe``), keep the best on val, score it once on test (``cfg``:
    features, steps, batch_size, lr, layer_decay, head_lr, ...; ``channels`` / ``channel_subsets``: :func:`~ssl_med.evaluators.channels.evaluate_channels`)."""
    if not isinstance(data, ClassificationData):
        raise TypeError("finetune needs a classification dataset (eval_data=breastmnist, vesselmnist3d, ...)")
    head_init = cfg.get("head_init", "random")
    if head_init not in ("random", "probe"):
        raise ValueError(f"eval.head_init must be 'random' or 'probe', got {head_init!r}")
    head_readouts(cfg)  # an unknown read-out fails before any fine-tune starts
    select_min_gain(cfg)  # as does a negative margin
    return evaluate_channels(_finetune, encoder, cfg, data, ctx, row_details=("chosen",))


def _finetune(encoder: Encoder, cfg: dict[str, Any], data: ClassificationData, ctx: EvalContext) -> EvalResult:
    """One grid of fine-tunes of ``encoder`` on ``data`` (see :func:`finetune`)."""
    readouts = head_readouts(cfg)
    head_state = None
    if cfg.get("head_init", "random") == "probe":  # one probe for the whole grid: it depends on the frozen encoder only
        start, _ = probe_head(encoder, data, cfg, ctx.device, readouts)
        head_state = copy.deepcopy({"norm": start.norm.state_dict(), "head": start.head.state_dict()})
        readouts = [start.readout]
    runs = []
    for readout, lr, decay in itertools.product(readouts, _as_list(cfg["lr"]), _as_list(cfg["layer_decay"])):
        score, step, state, history = finetune_once(encoder, cfg, data, ctx, lr, decay, readout, head_state)
        runs.append({
            "features": readout, "lr": lr, "layer_decay": decay, "val_score": score, "step": step, "history": history,
            "state": state,
        })
    best = max(runs, key=lambda r: r["val_score"])
    model = Classifier(copy.deepcopy(encoder), data.num_classes, best["features"], cfg.get("head_norm", "none")).to(ctx.device)
    model.load_state_dict(best["state"])
    warn_if_one_class(model, data, cfg, ctx, best)
    scores = predict(model, data.images["test"], data.task, cfg["eval_batch_size"], ctx.device)
    test = classification_metrics(scores, data.labels["test"], data.task)
    details = {
        "steps": int(cfg["steps"]),
        "features": model.readout,
        "chosen": {k: best[k] for k in ("features", "lr", "layer_decay", "val_score", "step")},
        "grid": [{k: r[k] for k in ("features", "lr", "layer_decay", "val_score", "history")} for r in runs],
    }
    return EvalResult(metrics=test, details=details)


def warn_if_one_class(model: Classifier, data: ClassificationData, cfg: dict[str, Any], ctx: EvalContext, best: dict[str, Any]) -> bool:
    """Log a warning when the fine-tuned classifier kept on val predicts the same class for every val image
    (single-label tasks): its AUROC then ranks images by a head that never crossed a decision boundary, and its
    accuracy is the majority class's share. Returns whether it warned."""
    if data.task == "multi-label":
        return False
    predicted = np.unique(predict(model, data.images["val"], data.task, cfg["eval_batch_size"], ctx.device).argmax(1))
    if len(predicted) > 1:
        return False
    log.warning(
        "finetune [%s]: the weights kept on val (%s, lr=%g, layer_decay=%g, step %d of %d) predict class %d for every "
        "val image: the head has not learnt a decision boundary within eval.steps. Give it more steps, a larger "
        "eval.head_lr, eval.head_norm=batchnorm, or start from a probe (eval=lpft)",
        ctx.encoder_label, best["features"], best["lr"], best["layer_decay"], best["step"], int(cfg["steps"]),
        int(predicted[0]),
    )
    return True
