"""Short end-to-end fine-tune (``eval=finetune``): the fine-tune column of the classification table.

Encoder + linear head on the pooled embedding, AdamW with layer-wise LR decay and a cosine
schedule, cross-entropy (BCE for multi-label), for a fixed budget of ``steps`` (the same for every
encoder). The weights with the best validation ``select_metric`` (checked every ``eval_every``
steps) are scored once on test. Augmentation: random flips along every spatial axis.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ssl_med.encoder import Encoder
from ssl_med.evaluators.base import EvalContext, EvalResult, layer_decay_groups
from ssl_med.evaluators.datasets import ClassificationData
from ssl_med.evaluators.metrics import classification_metrics
from ssl_med.registry import EVALUATORS
from ssl_med.train.schedules import cosine_schedule


class Classifier(nn.Module):
    """``encoder`` + ``nn.Linear(D, num_outputs)`` on ``encoder(x).pooled``: ``(B, C, *S)`` -> ``(B, K)``."""

    def __init__(self, encoder: Encoder, num_outputs: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.head = nn.Linear(encoder.embed_dim, num_outputs)
        nn.init.zeros_(self.head.bias)
        nn.init.trunc_normal_(self.head.weight, std=0.01)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.encoder(x).pooled)


def _random_flips(x: Tensor, generator: torch.Generator) -> Tensor:
    for axis in range(2, x.ndim):
        if torch.rand((), generator=generator) < 0.5:
            x = x.flip(axis)
    return x


@torch.no_grad()
def predict(model: nn.Module, images: Tensor, task: str, batch_size: int, device: str) -> np.ndarray:
    """Probabilities ``(N, K)`` (softmax; sigmoid for multi-label)."""
    model.eval()
    out = []
    for start in range(0, len(images), batch_size):
        logits = model(images[start : start + batch_size].to(device)).float()
        out.append((logits.sigmoid() if task == "multi-label" else logits.softmax(dim=1)).cpu())
    return torch.cat(out).numpy()


@EVALUATORS.register("finetune")
def finetune(encoder: Encoder, cfg: dict[str, Any], data: ClassificationData, ctx: EvalContext) -> EvalResult:
    """Fine-tune a copy of ``encoder`` end to end (``cfg``: steps, batch_size, lr, layer_decay, ...)."""
    if not isinstance(data, ClassificationData):
        raise TypeError("finetune needs a classification dataset (eval_data=breastmnist, vesselmnist3d, ...)")
    torch.manual_seed(ctx.seed)
    generator = torch.Generator().manual_seed(ctx.seed)
    model = Classifier(copy.deepcopy(encoder), data.num_classes).to(ctx.device)
    groups = layer_decay_groups(model.encoder, cfg["lr"], cfg["layer_decay"], cfg["weight_decay"])
    groups.append({"params": list(model.head.parameters()), "lr": cfg["head_lr"], "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups)
    steps = int(cfg["steps"])
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: cosine_schedule(s, steps, 1.0, 0.0)
    )
    x_train, y_train = data.images["train"], torch.from_numpy(data.labels["train"])
    best_state, best_score, history = None, -math.inf, []
    for step in range(1, steps + 1):
        model.train()
        idx = torch.randint(len(x_train), (int(cfg["batch_size"]),), generator=generator)
        x = _random_flips(x_train[idx], generator).to(ctx.device)
        logits = model(x)
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
            val = classification_metrics(
                predict(model, data.images["val"], data.task, cfg["eval_batch_size"], ctx.device),
                data.labels["val"],
                data.task,
            )
            history.append(
                {"step": step, "loss": loss.item(), **{f"val_{k}": v for k, v in val.items() if "/" not in k}}
            )
            score = val[cfg["select_metric"]]
            if not math.isfinite(score):
                score = val["accuracy"]
            if score > best_score:
                best_score, best_state = score, copy.deepcopy(model.state_dict())
    model.load_state_dict(best_state)
    scores = predict(model, data.images["test"], data.task, cfg["eval_batch_size"], ctx.device)
    test = classification_metrics(scores, data.labels["test"], data.task)
    return EvalResult(metrics=test, details={"history": history, "steps": steps})
