"""Why does a fine-tune not learn? How well conditioned an encoder's read-out is, beside its random-init twin.

A linear probe solves for its head exactly, so it reads label information from any direction of the
read-out, however little the features vary along it. A fine-tune's head starts near zero and follows the
gradient, which moves first along the directions of largest variance; where the label lives in directions
of tiny variance, the head does not reach it within a fine-tune's budget and the run predicts one class
(``eval=finetune`` warns). This script measures that on the train and val splits of a labelled set (test is
never read), for an exported encoder and for the random-init twin of ``--seed``:

* ``eff. rank``: the RankMe effective rank of the standardised train read-out ``(N, D)`` (each feature
  centred and scaled to unit variance, as the fine-tuner's BatchNorm head and the probes do);
* ``top-5 / top-20 variance``: the share of that standardised variance along its 5 / 20 principal directions;
* ``label R² top-5 / top-20 / all``: the share of the centred one-hot labels' variance that a least-squares
  fit on the first 5 / 20 / all principal directions explains (train, in sample);
* ``closed-form probe``: val AUROC of the ridge probe of the online evaluation
  (:func:`ssl_med.train.online_eval.ridge_probe_scores`, strength chosen by leave-one-out on train);
* ``head @ step``: val AUROC of a linear head trained by AdamW on the frozen, standardised read-out (the
  fine-tuner's affine-free BatchNorm with the train statistics; ``eval=finetune``'s ``head_lr``, ``batch_size``
  and ``weight_decay``, read from its config, and its near-zero initialisation), after each of ``--steps``: how much of the probe's
  information a gradient-trained head reaches at a fine-tune's budget, with the encoder held still.

::

    python scripts/diagnose_readout.py --checkpoint <run> --data breastmnist
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ssl_med import load_pretrained
from ssl_med.config import OnlineEvalConfig
from ssl_med.evaluators.api import match_encoder, random_init_like, resolve_encoder_dir
from ssl_med.evaluators.datasets import (
    ClassificationData,
    compose_evaluate,
    eval_data_config,
    load_eval_data,
    resolve_eval_data,
)
from ssl_med.evaluators.features import FEATURE_MODES, extract_features
from ssl_med.evaluators.metrics import classification_metrics
from ssl_med.train.collapse import effective_rank
from ssl_med.train.online_eval import ridge_probe_scores, standardise
from ssl_med.weights import read_config

COLUMNS = ("eff. rank", "top-5 variance", "top-20 variance", "label R² top-5", "label R² top-20", "label R² all")


def conditioning(features: np.ndarray, labels: np.ndarray, num_classes: int) -> dict[str, float]:
    """The :data:`COLUMNS` of a train read-out ``features`` ``(N, D)`` with single labels ``(N,)``."""
    (z,) = standardise(features)
    u, s, _ = np.linalg.svd(z.numpy(), full_matrices=False)
    share = s**2 / (s**2).sum()
    y = np.eye(num_classes)[labels]
    y = y - y.mean(0)
    captured = ((u.T @ y) ** 2).sum(1) / (y**2).sum()  # per principal direction, in order of variance
    rank = int((s > s[0] * 1e-10).sum())
    return {
        "eff. rank": effective_rank(z),
        "top-5 variance": float(share[:5].sum()),
        "top-20 variance": float(share[:20].sum()),
        "label R² top-5": float(captured[:5].sum()),
        "label R² top-20": float(captured[:20].sum()),
        "label R² all": float(captured[:rank].sum()),
    }


def head_curve(
    train: np.ndarray, train_labels: np.ndarray, val: np.ndarray, val_labels: np.ndarray, task: str, num_classes: int,
    steps: Sequence[int], lr: float, seed: int, batch_size: int = 32, weight_decay: float = 0.05,
) -> list[float]:
    """Val AUROC after each of ``steps`` of a linear head trained by AdamW on standardised read-outs."""
    x, q = (a.float() for a in standardise(train, val))
    y = torch.from_numpy(train_labels).long()
    generator = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(x.shape[1], num_classes)
    torch.nn.init.zeros_(head.bias)
    torch.nn.init.trunc_normal_(head.weight, std=0.01, generator=generator)
    optimiser = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=weight_decay)
    curve = []
    for step in range(1, max(steps) + 1):
        batch = torch.randint(len(x), (batch_size,), generator=generator)
        loss = torch.nn.functional.cross_entropy(head(x[batch]), y[batch])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step in steps:
            with torch.no_grad():
                scores = head(q).softmax(1).numpy()
            curve.append(classification_metrics(scores, val_labels, task)["auroc"])
    return curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="an export folder, or a run folder with encoder/")
    parser.add_argument("--data", required=True, help="an eval_data group (breastmnist, pneumoniamnist, vesselmnist3d, medmnist)")
    parser.add_argument("--data-path", help="eval_data.path, for eval_data=medmnist")
    parser.add_argument("--readout", default="auto", choices=["auto", *(m for m in FEATURE_MODES if m != "patch_tokens")],
                        help="auto: the pretraining objective's read-out, as eval.features=auto")
    parser.add_argument("--seed", type=int, default=0, help="the random-init twin's seed, and the head's")
    parser.add_argument("--steps", type=int, nargs="+", default=[50, 200, 600], help="head steps at which val is read")
    parser.add_argument("--head-lr", type=float, help="the head's learning rate (default: eval=finetune's head_lr)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--doc", type=Path, help="also write the table to this markdown file")
    args = parser.parse_args()
    if min(args.steps) < 1:
        parser.error(f"--steps must be positive, got {args.steps}")
    torch.set_num_threads(args.threads)
    finetune = compose_evaluate(["eval=finetune"]).eval  # the head's settings, from the fine-tuner's own config
    head_lr = float(finetune.head_lr) if args.head_lr is None else args.head_lr
    folder = resolve_encoder_dir(args.checkpoint)
    encoders = {"pretrained": load_pretrained(folder), "random init": random_init_like(folder, args.seed)}
    data_cfg = eval_data_config(args.data, [f"eval_data.path={args.data_path}"] if args.data_path else [])
    eval_cfg, data_cfg = match_encoder({"features": args.readout}, data_cfg, read_config(folder))
    readout = eval_cfg["features"]
    data_cfg = resolve_eval_data(data_cfg)  # cheap: the task is read without decoding an image
    if data_cfg.get("kind") != "medmnist" or data_cfg.get("task") == "multi-label":
        raise SystemExit(f"--data {args.data}: a single-label classification set is needed (label R² reads one class per image)")
    data = load_eval_data(data_cfg, encoders["pretrained"].in_chans or 1)
    assert isinstance(data, ClassificationData)
    head_columns = [f"head @ {s}" for s in args.steps]
    lines = [
        f"Read-out `{readout}` of `{folder}` on {data.name} (train {len(data.labels['train'])}, val "
        f"{len(data.labels['val'])}); random twin seed {args.seed}; head LR {head_lr:g}",
        "",
        "| encoder | " + " | ".join([*COLUMNS, "closed-form probe", *head_columns]) + " |",
        "|---" * (2 + len(COLUMNS) + len(head_columns)) + "|",
    ]
    print("\n".join(lines), flush=True)
    for name, model in encoders.items():
        train, val = (extract_features(model, data.images[s], readout) for s in ("train", "val"))
        cells = conditioning(train, data.labels["train"], data.num_classes)
        scores, _ = ridge_probe_scores(train, data.labels["train"], val, data.num_classes, OnlineEvalConfig().ridge, data.task)
        probe = classification_metrics(scores, data.labels["val"], data.task)["auroc"]
        curve = head_curve(
            train, data.labels["train"], val, data.labels["val"], data.task, data.num_classes, args.steps, head_lr, args.seed,
            batch_size=int(finetune.batch_size), weight_decay=float(finetune.weight_decay),
        )
        row = [f"{cells[c]:.1f}" if c == "eff. rank" else f"{cells[c]:.3f}" for c in COLUMNS]
        lines.append(f"| {name} | " + " | ".join([*row, f"{probe:.3f}", *(f"{a:.3f}" for a in curve)]) + " |")
        print(lines[-1], flush=True)
    if args.doc:
        args.doc.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
