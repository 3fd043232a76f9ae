"""CPU benchmark: training throughput and peak memory of every registered objective x backbone.

Writes a markdown report (default ``docs/benchmarks/objectives.md``, or ``objectives_default.md``
with ``--size default``)::

    python scripts/bench_objectives.py                         # all objectives x backbones
    python scripts/bench_objectives.py --objectives voco graph_matching --backbones vit --steps 5
    python scripts/bench_objectives.py --size default --objectives dino mae voco --backbones vit mamba xlstm

``--size tiny`` (the default): each configuration is composed like ``ssl_med pretrain backbone=B
objective=O data=D`` (Hydra, with tiny overrides: width 48, depth 2 where the backbone has those keys;
small objective heads) on random crops of fixed tiny sizes (below). ``--size default``: composed exactly
as the design-card command ``ssl_med pretrain backbone=B objective=O`` composes it -- the objective's own
data config (e.g. VoCo's ``demo3d_voco`` regions), its batch size, the view geometry fitted by
:func:`ssl_med.train.geometry.prepare_pretrain_config` -- with no overrides; the report adds each
backbone's step-time and peak-memory ratios to the ViT of the same objective in the same run.

Built with :func:`ssl_med.train.run.build_encoder` / ``build_objective`` and trained for ``--steps``
AdamW steps on batches made by the objective's own view transform from random crops of the data
config's size. One subprocess per configuration, so the peak resident memory (``VmHWM``) is per
configuration. For ``graph_matching`` the share of the step spent in the combinatorial solver
(forward and backward solves) is reported.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bench_proc import proc_status_mib, run_in_subprocess

if TYPE_CHECKING:
    from ssl_med.config import PretrainConfig

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
#: ``--size default``: the objective's own data config and batch size (label and batch come from the config)
DESIGN_CARD_DATA: list[tuple[str | None, list[str], int | None]] = [(None, [], None)]
SIZES = ("tiny", "default")
TINY_OBJECTIVE = {
    "voco": ["objective.proj_hidden_dim=64", "objective.proj_dim=64"],
    "graph_matching": ["objective.projector=[64,64]"],
    "mae": ["objective.decoder_dim=32", "objective.decoder_depth=1", "objective.decoder_heads=2"],
}


def design_card_overrides(objective: str, backbone: str) -> list[str]:
    """The overrides of the design-card command ``ssl_med pretrain backbone=B objective=O``."""
    return [f"backbone={backbone}", f"objective={objective}"]


def compose_config(
    objective: str,
    backbone: str,
    size: str = "tiny",
    data: list[str] | None = None,
    batch: int | None = None,
    overrides: list[str] | None = None,
) -> PretrainConfig:
    """The parsed :class:`~ssl_med.config.PretrainConfig` of one configuration, without building anything.

    ``size="default"`` composes the design-card command and fits its view geometry as ``ssl_med pretrain``
    does (``data`` and ``batch`` must be unset); ``size="tiny"`` adds ``data``, ``data.batch_size=batch`` and
    the tiny width/depth/head overrides. ``overrides`` (e.g. ``trainer.activation_checkpointing=true``)
    are appended in both cases.
    """
    from hydra import compose, initialize_config_module

    from ssl_med.config import parse_pretrain_config
    from ssl_med.train.geometry import prepare_pretrain_config

    if size not in SIZES:
        raise ValueError(f"size={size!r}: one of {SIZES}")
    base = design_card_overrides(objective, backbone)
    extra = list(overrides or [])
    with initialize_config_module(config_module="ssl_med.conf", version_base="1.3"):
        if size == "default":
            if data or batch is not None:
                raise ValueError("size='default' takes the data config and batch size from the composition")
            return prepare_pretrain_config(compose(config_name="pretrain", overrides=base + extra), base + extra)
        base += [*(data or []), f"data.batch_size={batch}"]
        raw = compose(config_name="pretrain", overrides=base + extra)
        tiny = [f"backbone.{k}={v}" for k, v in (("embed_dim", 48), ("depth", 2), ("num_heads", 2)) if k in raw.backbone]
        tiny += [o for o in TINY_OBJECTIVE.get(objective, []) if o.split("=")[0].split(".")[1] in raw.objective]
        return parse_pretrain_config(compose(config_name="pretrain", overrides=base + tiny + extra))


def input_label(cfg: PretrainConfig) -> str:
    """``demo3d_voco 32x96x96``: the data config's name and crop."""
    return f"{cfg.data.name} {'x'.join(str(int(s)) for s in cfg.data.crop_size)}"


def run_one(
    objective: str,
    backbone: str,
    data: list[str],
    batch: int | None,
    steps: int,
    threads: int,
    size: str = "tiny",
    overrides: list[str] | None = None,
) -> dict[str, Any]:
    """Build and time one configuration in this process; returns a JSON-able dict."""
    import torch
    from monai.data import MetaTensor
    from torch.utils.data import default_collate

    from ssl_med.ops.graph_matching_solvers import SOLVER_STATS
    from ssl_med.train.run import build_encoder, build_objective

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = compose_config(objective, backbone, size, data if size == "tiny" else None, batch, overrides)
    batch = int(cfg.data.batch_size)
    base_mib = proc_status_mib("VmRSS")  # imports and composition, before the model
    encoder = build_encoder(cfg.backbone)
    obj = build_objective(cfg.objective, encoder)
    if cfg.trainer.activation_checkpointing:  # as ssl_med pretrain does
        encoder.set_grad_checkpointing(True)
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
        "peak_mib": proc_status_mib(),
        "base_mib": base_mib,
        "batch": batch,
        "input": input_label(cfg),
        "solver_share": sum(solver) / sum(times) if objective == "graph_matching" else None,
        "params_m": sum(p.numel() for p in obj.parameters()) / 1e6,
    }


def main() -> None:
    from ssl_med.registry import BACKBONES, OBJECTIVES

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--objectives", nargs="*", default=None, help="default: all registered")
    ap.add_argument("--backbones", nargs="*", default=None, help="default: all registered")
    ap.add_argument("--size", choices=SIZES, default="tiny",
                    help="tiny: width 48, depth 2, fixed small crops; default: `ssl_med pretrain backbone=B objective=O` "
                         "as composed, no overrides")  # fmt: skip
    ap.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up step")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: stable on a shared CPU)")
    ap.add_argument("--timeout", type=int, default=600, help="seconds per configuration")
    ap.add_argument("--out", type=Path, default=None,
                    help="report; default docs/benchmarks/objectives.md (tiny) or objectives_default.md")  # fmt: skip
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("overrides", nargs="*", help="config overrides for every configuration "
                    "(e.g. trainer.activation_checkpointing=true)")  # fmt: skip
    args = ap.parse_args()
    if args.one:  # child process
        spec = json.loads(args.one)
        print(json.dumps(run_one(**spec)))
        return
    if args.out is None:
        args.out = REPO / "docs" / "benchmarks" / ("objectives.md" if args.size == "tiny" else "objectives_default.md")

    objectives = args.objectives or OBJECTIVES.names()
    backbones = args.backbones or BACKBONES.names()
    rows = []
    for objective in objectives:
        for backbone in backbones:
            for label, data, batch in DESIGN_CARD_DATA if args.size == "default" else DATA.get(objective, DEFAULT_DATA):
                spec = dict(objective=objective, backbone=backbone, data=data, batch=batch, steps=args.steps,
                            threads=args.threads, size=args.size, overrides=args.overrides)  # fmt: skip
                result = run_in_subprocess(__file__, spec, args.timeout)  # its peak memory is its own
                # --size default: the input and batch are the composed data config's, reported by the child
                if label is None:
                    label, batch = result.get("input", "objective's data"), result.get("batch")
                rows.append((objective, backbone, label, batch, result))
                print(objective, backbone, label, result, flush=True)
    write_report(args, rows)


INTRO = {
    "tiny": [
        "Tiny configurations: width 48, depth 2 (where the backbone has those keys), patch 8, random crops through",
        "each objective's own view transform; one AdamW step = forward + backward + update (+ EMA).",
        "Peak memory is the process's peak resident set (includes the Python/torch baseline of ~0.4-0.5 GiB).",
    ],
    "default": [
        "Default sizes: each configuration is composed exactly as the design-card command",
        "`ssl_med pretrain backbone=B objective=O` composes it (the objective's own data config, e.g. VoCo's",
        "`demo3d_voco` regions; its batch size; the view geometry fitted at start-up), with no width/depth/head",
        "overrides. Batches are random crops of the data config's crop size through each objective's own view",
        "transform (the demo data's geometry, random pixel values); one AdamW step = forward + backward + update",
        "(+ EMA). Peak memory is the process's peak resident set (VmHWM, includes the Python/torch baseline);",
        "*above baseline* subtracts the resident set just before the model is built. Ratios are to the ViT of the",
        "same objective in the same run.",
        "",
        "**The machine was shared with other CPU benchmark jobs during the run** (load average above): absolute",
        "times are inflated and noisy; the ratios compare configurations measured back to back in the same run.",
    ],
}
#: --size default: issue #21's goals for a Mamba/xLSTM step and peak memory relative to the ViT
GOALS = {"step_s": 2.0, "peak_mib": 1.5}


def ratio(r: dict[str, Any], vit: dict[str, Any] | None, key: str) -> float | None:
    """``r[key] / vit[key]`` (``None`` without a successful ViT row)."""
    return r[key] / vit[key] if vit and "error" not in vit and "error" not in r else None


def fmt_ratio(x: float | None) -> str:
    """``1.23x``, or ``-`` for no ratio."""
    return "-" if x is None else f"{x:.2f}x"


def verdict(x: float, goal: float) -> str:
    """``2.50x ViT (<= 2x: **not met**)``."""
    return f"{x:.2f}x ViT (<= {goal:g}x: {'met' if x <= goal else '**not met**'})"


def write_report(args: argparse.Namespace, rows: list[tuple[str, str, str, Any, dict[str, Any]]]) -> None:
    """The markdown report; ``--size default`` adds the ratios to the ViT and the goals per pair."""
    default = args.size == "default"
    load = os.getloadavg()
    flags = ("--size default " if default else "") + f"--steps {args.steps} --threads {args.threads}"
    flags += "".join(f" {o}" for o in args.overrides)
    cmd = "python scripts/bench_objectives.py " + " ".join(sys.argv[1:]) if default else "python scripts/bench_objectives.py"
    extra = ["step / ViT", "peak RSS (MiB)", "peak / ViT", "above baseline (MiB)", "params (M)"] if default else ["peak RSS (MiB)"]
    header = ["objective", "backbone", "input", "batch", "samples/s", "step (s)", *extra, "solver share"]
    lines = [
        "# Objectives" + (" at default sizes" if default else "") + ": CPU training throughput and peak memory",
        "",
        f"Generated by `{cmd}` "
        f"(`{flags}`; {os.cpu_count()} CPUs, load average "
        f"{load[0]:.1f} at the end -- a shared machine, so absolute numbers are noisy).",
        *INTRO[args.size],
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    vits = {(o, label): r for o, b, label, _, r in rows if b == "vit"}
    goals = []
    for objective, backbone, label, batch, r in rows:
        if "error" in r:
            lines.append(f"| {objective} | {backbone} | {label} | {batch} | failed: {r['error']} |" + " |" * (len(header) - 5))
            continue
        share = f"{100 * r['solver_share']:.0f} %" if r["solver_share"] is not None else "-"
        cells = [f"{r['peak_mib']:.0f}"]
        if default:
            vit = vits.get((objective, label))
            step_x, peak_x = ratio(r, vit, "step_s"), ratio(r, vit, "peak_mib")
            cells = [fmt_ratio(step_x), cells[0], fmt_ratio(peak_x), f"{r['peak_mib'] - r['base_mib']:.0f}", f"{r['params_m']:.1f}"]
            if backbone != "vit" and step_x is not None:
                goals.append(f"- {objective} / {backbone}: step {verdict(step_x, GOALS['step_s'])}; "
                             f"peak memory {verdict(peak_x, GOALS['peak_mib'])}")  # fmt: skip
        lines.append(
            f"| {objective} | {backbone} | {label} | {batch} | {r['samples_per_s']:.1f} | {r['step_s']:.3f} "
            f"| {' | '.join(cells)} | {share} |"
        )
    if goals:
        lines += ["", "Issue #21's goals (step <= 2x, peak memory <= 1.5x the ViT of the same objective), per pair:", "", *goals]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
