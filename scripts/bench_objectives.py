"""CPU benchmark: training throughput and peak memory of every registered objective x backbone.

Writes a markdown report (default ``docs/benchmarks/objectives.md``)::

    python scripts/bench_objectives.py                         # all objectives x backbones
    python scripts/bench_objectives.py --objectives voco graph_matching --backbones vit --steps 5

Each configuration is composed like ``ssl_med pretrain backbone=B objective=O data=D`` (Hydra, with
tiny overrides: width 48, depth 2 where the backbone has those keys; small objective heads), built
with :func:`ssl_med.train.run.build_encoder` / ``build_objective``, and trained for ``--steps`` AdamW
steps on batches made by the objective's own view transform from random crops of the data
config's size (fixed tiny sizes, below). One subprocess per configuration, so the peak resident
memory (``VmHWM``) is per configuration. For ``graph_matching`` the share of the step spent in the
combinatorial solver (forward and backward solves) is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

#: objective -> list of (label, data overrides, batch size)
DATA: dict[str, list[tuple[str, list[str], int]]] = {
    "voco": [("3D 16x48x48 region", ["data=demo3d", "data.crop_size=[16,48,48]", "backbone.img_size=[16,16,16]"], 4)],
    "graph_matching": [
        ("2D 32x32", ["data=demo", "data.crop_size=[32,32]"], 20),
        ("3D 16^3", ["data=demo3d", "data.crop_size=[16,16,16]"], 20),
    ],
}
DEFAULT_DATA = [("2D 32x32", ["data=demo", "data.crop_size=[32,32]"], 16)]
TINY_OBJECTIVE = {
    "voco": ["objective.proj_hidden_dim=64", "objective.proj_dim=64"],
    "graph_matching": ["objective.projector=[64,64]"],
    "mae": ["objective.decoder_dim=32", "objective.decoder_depth=1", "objective.decoder_heads=2"],
}


def _peak_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_one(objective: str, backbone: str, data: list[str], batch: int, steps: int, threads: int) -> dict:
    """Build and time one configuration in this process; returns a JSON-able dict."""
    import torch
    from hydra import compose, initialize_config_module
    from monai.data import MetaTensor
    from torch.utils.data import default_collate

    from ssl_med.config import parse_pretrain_config
    from ssl_med.ops.graph_matching_solvers import SOLVER_STATS
    from ssl_med.train.run import build_encoder, build_objective

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    overrides = [f"backbone={backbone}", f"objective={objective}", *data, f"data.batch_size={batch}"]
    with initialize_config_module(config_module="ssl_med.conf", version_base="1.3"):
        raw = compose(config_name="pretrain", overrides=overrides)
        tiny = [f"backbone.{k}={v}" for k, v in (("embed_dim", 48), ("depth", 2), ("num_heads", 2)) if k in raw.backbone]
        tiny += [o for o in TINY_OBJECTIVE.get(objective, []) if o.split("=")[0].split(".")[1] in raw.objective]
        cfg = parse_pretrain_config(compose(config_name="pretrain", overrides=overrides + tiny))
    encoder = build_encoder(cfg.backbone)
    obj = build_objective(cfg.objective, encoder)
    views = obj.view_transform()
    if hasattr(views, "set_random_state"):
        views.set_random_state(0)
    c = cfg.data.num_channels or 1

    def plain(sample: dict) -> dict:  # as RandomCropDataset hands them over: no MONAI MetaTensors
        return {k: v.as_tensor() if isinstance(v, MetaTensor) else v for k, v in sample.items()}

    def make_batch() -> dict:
        return default_collate([plain(views({"image": torch.rand(c, *cfg.data.crop_size)})) for _ in range(batch)])

    opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=1e-4)
    batches = [make_batch() for _ in range(min(steps, 3))]
    times, solver = [], []
    for step in range(steps + 1):  # step 0 is warm-up
        b = batches[step % len(batches)]
        s0 = SOLVER_STATS["seconds"]
        t0 = time.perf_counter()
        out = obj(b)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        obj.on_train_step_end(step + 1, steps + 1)
        dt = time.perf_counter() - t0
        if step:
            times.append(dt)
            solver.append(SOLVER_STATS["seconds"] - s0)
    step_s = sum(times) / len(times)
    return {
        "samples_per_s": batch / step_s,
        "step_s": step_s,
        "peak_mib": _peak_mib(),
        "solver_share": sum(solver) / sum(times) if objective == "graph_matching" else None,
        "params_m": sum(p.numel() for p in obj.parameters()) / 1e6,
    }


def main() -> None:
    from ssl_med.registry import BACKBONES, OBJECTIVES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objectives", nargs="*", default=None, help="default: all registered")
    ap.add_argument("--backbones", nargs="*", default=None, help="default: all registered")
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: stable on a shared CPU)")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per configuration")
    ap.add_argument("--out", type=Path, default=REPO / "docs" / "benchmarks" / "objectives.md")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:  # child process
        spec = json.loads(args.one)
        print("RESULT " + json.dumps(run_one(**spec)))
        return

    objectives = args.objectives or OBJECTIVES.names()
    backbones = args.backbones or BACKBONES.names()
    rows = []
    for objective in objectives:
        for backbone in backbones:
            for label, data, batch in DATA.get(objective, DEFAULT_DATA):
                spec = dict(objective=objective, backbone=backbone, data=data, batch=batch, steps=args.steps, threads=args.threads)
                try:
                    proc = subprocess.run(
                        [sys.executable, __file__, "--one", json.dumps(spec)],
                        capture_output=True, text=True, timeout=args.timeout, cwd=REPO, env=os.environ.copy(),
                    )
                    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
                    if line is None:
                        err = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                        result = {"error": err[:160]}
                    else:
                        result = json.loads(line[7:])
                except subprocess.TimeoutExpired:
                    result = {"error": f"timeout after {args.timeout}s"}
                rows.append((objective, backbone, label, batch, result))
                print(objective, backbone, label, result, flush=True)
    write_report(args, rows)


def write_report(args: argparse.Namespace, rows: list) -> None:
    load = os.getloadavg()
    lines = [
        "# Objectives: CPU training throughput and peak memory",
        "",
        "Generated by `python scripts/bench_objectives.py` "
        f"(`--steps {args.steps} --threads {args.threads}`; {os.cpu_count()} CPUs, load average "
        f"{load[0]:.1f} at the end -- a shared machine, so absolute numbers are noisy).",
        "Tiny configurations: width 48, depth 2 (where the backbone has those keys), patch 8, random crops through",
        "each objective's own view transform; one AdamW step = forward + backward + update (+ EMA).",
        "Peak memory is the process's peak resident set (includes the Python/torch baseline of ~0.4-0.5 GiB).",
        "",
        "| objective | backbone | input | batch | samples/s | step (s) | peak RSS (MiB) | solver share |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for objective, backbone, label, batch, r in rows:
        if "error" in r:
            lines.append(f"| {objective} | {backbone} | {label} | {batch} | failed: {r['error']} | | | |")
            continue
        share = f"{100 * r['solver_share']:.0f} %" if r["solver_share"] is not None else "-"
        lines.append(
            f"| {objective} | {backbone} | {label} | {batch} | {r['samples_per_s']:.1f} | {r['step_s']:.3f} "
            f"| {r['peak_mib']:.0f} | {share} |"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
