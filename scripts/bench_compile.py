"""CPU benchmark: pretraining step time eager against ``trainer.compile=true``, and the compile time.

Writes ``docs/benchmarks/compile.md`` (``--out``) and prints its table::

    nice -n 10 python scripts/bench_compile.py                    # ViT-tiny, DINO and MAE, 2D and 3D
    nice -n 10 python scripts/bench_compile.py --cases mae:2d --steps 6 --out /tmp/compile.md

Each case is composed like ``ssl_med pretrain objective=O data=D`` (ViT-tiny, the objective's default
views and heads, ``--batch`` or the case's batch of real demo crops made before timing) and built
once; two copies with the same initial weights train AdamW steps on the same batches, one eager and
one compiled by :func:`ssl_med.train.compile.compile_children` (what ``trainer.compile=true`` does:
every child module of the objective, ``torch.compile`` mode ``--mode``, inductor).

* **compile time**: the compiled copy's first ``--warmup`` steps (dynamo tracing and inductor code
  generation of forward and backward for every input shape; DINO has two crop sizes) minus as many
  of its timed steps. Inductor's on-disk caches are off unless ``--warm-cache``, so this is a cold
  compile, as on a fresh machine.
* **step times**: after the warm-up, eager and compiled steps alternate (E, C, E, C, ...) so a
  shared machine's load hits both alike; the median of ``--steps`` steps each. The ratio eager /
  compiled is the speed-up (> 1: compiled is faster).
* **loss agreement**: the relative difference of the two copies' losses at the first timed step.
"""

from __future__ import annotations

import argparse
import copy
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

if "--warm-cache" not in sys.argv:
    os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")  # before torch is imported

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from ssl_med.evaluators.report import markdown_table  # noqa: E402
from ssl_med.objective import Objective  # noqa: E402
from ssl_med.train.batches import objective_and_batches  # noqa: E402
from ssl_med.train.compile import CompileSettings, compile_children  # noqa: E402

#: case name -> (objective, data group, default batch)
CASES: dict[str, tuple[str, str, int]] = {
    "mae:2d": ("mae", "demo", 16),
    "dino:2d": ("dino", "demo", 16),
    "mae:3d": ("mae", "demo3d", 4),
    "dino:3d": ("dino", "demo3d", 4),
}


@dataclass
class Result:
    case: str
    geometry: str
    batch: int
    eager_s: float
    compiled_s: float
    compile_s: float
    loss_diff: float


def build(objective: str, data: str, batch: int, n_batches: int) -> tuple[Objective, list[dict], str]:
    """The objective (ViT-tiny, defaults), ``n_batches`` batches of real demo crops, and the geometry."""
    cfg, obj, batches = objective_and_batches(
        [f"objective={objective}", f"data={data}", f"data.batch_size={batch}"], n_batches
    )
    size = "x".join(map(str, cfg.backbone["img_size"]))
    return obj, batches, f"{cfg.data.spatial_dims}D {size}/p{cfg.backbone['patch_size']}"


class Stepper:
    """One model copy and its AdamW optimiser; :meth:`step` times one training step."""

    def __init__(self, obj: Objective) -> None:
        self.obj = obj
        self.opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=1e-4)
        self.count = 0

    def step(self, batch: dict) -> tuple[float, float]:
        """Seconds and loss of forward + backward + optimiser step (random draws seeded per step)."""
        self.count += 1
        torch.manual_seed(self.count)
        t0 = time.perf_counter()
        out = self.obj(batch)
        self.opt.zero_grad()
        out.loss.backward()
        self.opt.step()
        self.obj.on_train_step_end(self.count, 1000)
        return time.perf_counter() - t0, out.loss.item()


def bench(case: str, batch: int | None, steps: int, warmup: int, mode: str) -> Result:
    objective, data, default_batch = CASES[case]
    batch = batch or default_batch
    obj, batches, geometry = build(objective, data, batch, warmup + steps)
    eager, compiled = Stepper(copy.deepcopy(obj)), Stepper(obj)
    compile_children(compiled.obj, CompileSettings(mode=mode))
    warm_c = [compiled.step(b)[0] for b in batches[:warmup]]
    for b in batches[:warmup]:
        eager.step(b)
    times_e, times_c, diffs = [], [], []
    for b in batches[warmup:]:
        te, le = eager.step(b)
        tc, lc = compiled.step(b)
        times_e.append(te)
        times_c.append(tc)
        diffs.append(abs(lc - le) / abs(le))
    med_e, med_c = statistics.median(times_e), statistics.median(times_c)
    return Result(case, geometry, batch, med_e, med_c, sum(warm_c) - warmup * med_c, diffs[0])


def table(results: list[Result]) -> str:
    columns = [
        "case", "input", "batch", "eager step (s)", "compiled step (s)", "eager / compiled",
        "compile time (s)", "loss rel. diff",
    ]
    rows = [
        {
            "case": r.case,
            "input": r.geometry,
            "batch": r.batch,
            "eager step (s)": f"{r.eager_s:.3f}",
            "compiled step (s)": f"{r.compiled_s:.3f}",
            "eager / compiled": f"{r.eager_s / r.compiled_s:.2f}",
            "compile time (s)": f"{r.compile_s:.0f}",
            "loss rel. diff": f"{r.loss_diff:.1e}",
        }
        for r in results
    ]
    return markdown_table(rows, columns)


def machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {load:.1f} at the end"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="*", default=list(CASES), choices=list(CASES))
    ap.add_argument("--batch", type=int, default=None, help="crops per step (default: 16 in 2D, 4 in 3D)")
    ap.add_argument("--steps", type=int, default=10, help="timed steps per copy")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per copy (the compiled copy compiles in them)")
    ap.add_argument("--mode", default="default", help="torch.compile mode (trainer.compile_mode)")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: stable on a shared CPU)")
    ap.add_argument("--warm-cache", action="store_true", help="keep inductor's on-disk caches (compile time is then a warm one)")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "compile.md")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    results = []
    for case in args.cases:
        results.append(bench(case, args.batch, args.steps, args.warmup, args.mode))
        print(table(results[-1:]).splitlines()[-1], flush=True)
    text = table(results)
    print(text)
    cache = "warm inductor caches" if args.warm_cache else "inductor caches off (cold compile)"
    command = " ".join(["python scripts/bench_compile.py", *sys.argv[1:]])
    args.out.write_text(
        f"# torch.compile on the CPU: eager against `trainer.compile=true`\n\n"
        f"Generated by `{command}` ({machine()}; {args.threads} thread(s), mode `{args.mode}`, {cache}).\n\n"
        f"{text}\n"
    )


if __name__ == "__main__":
    main()
