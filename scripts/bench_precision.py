"""CPU benchmark: training step time and loss agreement, float32 against bf16 autocast.

Prints a markdown table (paste into ``docs/benchmarks/precision.md``)::

    python scripts/bench_precision.py                           # ViT-tiny MAE and DINO on the demo data
    python scripts/bench_precision.py --objectives mae --steps 5 --batch 8

Each objective is composed like ``ssl_med pretrain objective=O`` (default ViT-tiny backbone, demo
data, the objective's default views and heads; ``--batch`` crops per step), built once, and trained
``--steps`` AdamW steps in each precision from the same initial weights on the same batches (real demo
crops through the objective's view transform, made before timing). bf16 runs the forward under
``torch.autocast("cpu", dtype=torch.bfloat16)``, as ``trainer.precision=bf16-mixed`` does. The step
time is the median over steps 2..N (step 1 warms up); the loss columns compare step 1 (same weights,
same batch) and step N (after N - 1 updates in each precision).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ssl_med.objective import Objective  # noqa: E402
from ssl_med.train.batches import objective_and_batches  # noqa: E402


def build(objective: str, batch: int, steps: int) -> tuple[Objective, list[dict]]:
    """The objective (ViT-tiny, default options) and ``steps`` batches of real demo crops."""
    _, obj, batches = objective_and_batches([f"objective={objective}", f"data.batch_size={batch}"], steps)
    return obj, batches


def train(obj: Objective, batches: list[dict], bf16: bool) -> tuple[list[float], list[float]]:
    """Per-step seconds and losses of AdamW steps on ``batches`` (random draws seeded per step)."""
    opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=1e-4)
    times, losses = [], []
    for step, batch in enumerate(batches, start=1):
        torch.manual_seed(step)
        t0 = time.perf_counter()
        autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with autocast:
            out = obj(batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        obj.on_train_step_end(step, len(batches))
        times.append(time.perf_counter() - t0)
        losses.append(out.loss.item())
    return times, losses


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objectives", nargs="*", default=["mae", "dino"])
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: stable on a shared CPU)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print("| objective | batch | float32 step (s) | bf16 step (s) | bf16 / float32 | step-1 loss rel. diff | step-N loss rel. diff |")
    print("|---|---|---|---|---|---|---|")
    for objective in args.objectives:
        obj, batches = build(objective, args.batch, args.steps)
        t32, l32 = train(copy.deepcopy(obj), batches, bf16=False)
        t16, l16 = train(obj, batches, bf16=True)
        s32, s16 = statistics.median(t32[1:]), statistics.median(t16[1:])
        first, last = abs(l16[0] - l32[0]) / abs(l32[0]), abs(l16[-1] - l32[-1]) / abs(l32[-1])
        print(f"| {objective} | {args.batch} | {s32:.3f} | {s16:.3f} | {s16 / s32:.2f} | {first:.1e} | {last:.1e} |", flush=True)


if __name__ == "__main__":
    main()
