"""Re-read finished pretraining runs with the online ridge probe: a fixed L2 strength against the strength
chosen by leave-one-out on train (``online_eval.ridge``'s default grid).

For each run folder ``<out>/<dataset>-<backbone>-<objective>-s<seed>`` written by
``scripts/bench_representation.py``, the random-init twin of its seed, the last step's ``encoder/`` and,
where present, the val-selected ``encoder_best/`` embed the labelled set's train and val splits (the
objective's read-out, as the online evaluation does); the val AUROC of the closed-form ridge probe is
printed for both strengths, with the strength leave-one-out chose. Test is never read::

    python scripts/reread_online_probe.py --out /path/to/bench --dataset breastmnist --objective hi_end_mae --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from ssl_med import load_pretrained
from ssl_med.config import OnlineEvalConfig
from ssl_med.evaluators.api import random_init_like
from ssl_med.evaluators.features import extract_features
from ssl_med.evaluators.metrics import classification_metrics
from ssl_med.registry import OBJECTIVES
from ssl_med.train.online_eval import OnlineEval, build_online_eval, ridge_probe_scores


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="the --out folder of bench_representation.py")
    parser.add_argument("--dataset", required=True, help="an eval_data group (breastmnist, pneumoniamnist, vesselmnist3d)")
    parser.add_argument("--objective", required=True)
    parser.add_argument("--backbone", default="vit")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--fixed", type=float, default=1.0, help="the fixed strength to compare with (the old default)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = OnlineEvalConfig(data=args.dataset)
    online: dict[tuple[int, int], OnlineEval] = {}  # (size, channels) -> the online evaluation's subsets, read once
    print("| seed | encoder | val AUROC, ridge fixed | val AUROC, ridge by leave-one-out (chosen) |\n|---|---|---|---|")
    for seed in args.seeds:
        run = args.out / f"{args.dataset}-{args.backbone}-{args.objective}-s{seed}" / "run"
        backbone = json.loads((run / "encoder" / "config.json").read_text())["backbone"]
        key = (int(backbone["img_size"][0]), int(backbone.get("in_chans") or 1))
        if key not in online:
            built = build_online_eval(cfg, list(backbone["img_size"]), key[1])
            assert built is not None  # cfg.data is set
            online[key] = built
        evaluation = online[key]
        images, labels = evaluation.images, evaluation.labels
        mode = OBJECTIVES.get(args.objective).eval_features  # the online evaluation's features=auto
        encoders = {"random init": random_init_like(run / "encoder", seed), "last step": load_pretrained(run / "encoder")}
        if (run / "encoder_best").is_dir():
            encoders["selected on val"] = load_pretrained(run / "encoder_best")
        for name, encoder in encoders.items():
            train, val = (extract_features(encoder, images[s], mode) for s in ("train", "val"))
            cells = []
            for ridge in (args.fixed, cfg.ridge):
                scores, chosen = ridge_probe_scores(train, labels["train"], val, evaluation.num_classes, ridge, evaluation.task)
                cells.append(f"{classification_metrics(scores, labels['val'], evaluation.task)['auroc']:.3f}")
            print(f"| {seed} | {name} | {cells[0]} | {cells[1]} ({chosen:g}) |", flush=True)


if __name__ == "__main__":
    main()
