"""BraTS in domain: does multi-sequence pretraining help a frozen-encoder segmentation, on any subset of sequences?

For each seed, the documented workflow on the one BraTS 2020 case in ``../shared/data`` (the commands a
user runs, nothing behind their back):

1. ``ssl_med ingest <case folder> --spacing 2 2 2`` -- the four sequences become one 4-channel volume
   with channel names ``t1, t1ce, t2, flair`` (from the file names), the ``_seg`` file its label map;
2. ``ssl_med pretrain`` of **MAE** on a 4-channel ViT (absent sequences zero-filled) and of **BM-MAE**
   on the per-modality ViT (one patch kernel per sequence, absent ones left out), and of **Hi-End-MAE**
   (the best 3D objective on VesselMNIST3D), **VoCo** (position-aware volume contrast, made for large
   volumes: 32x64x64 regions cut into four 32^3 bases), **DINO** (its exported EMA teacher) and **graph
   matching** (LVM-Med) on the 4-channel ViT, with ``data.channel_dropout`` so all see incomplete protocols;
3. ``ssl_med evaluate eval=segmentation`` with ``eval.channel_subsets``: one frozen-encoder UNETR
   decoder per subset of sequences, the pretrained encoder beside its random-init twin (same seed);
   mean Dice over NCR / ED / ET on the test slab. ``--modes frozen finetune`` also trains the encoder with the
   decoder (``eval.mode=finetune``: encoder LR a tenth of the decoder's, layer-decayed; both arms alike, each
   with its pretrained <-> fine-tuned weight-interpolation curve).

Runs that exist are reused and only missing subsets are evaluated (each evaluation writes
``seg-<objective>*/results.json``, ``segft-<objective>*`` when fine-tuned, in ``<out>/brats-s<seed>/``), so a
table can grow a subset or a mode without redoing the others. The table (mean ± std over the seeds that have
the subset, gap per seed) goes to ``--doc`` between ``<!-- brats:begin -->`` and ``<!-- brats:end -->``::

    python scripts/bench_brats.py --seeds 0 1 2 --subsets t1,t1ce,t2,flair flair
    python scripts/bench_brats.py --seeds 0 --subsets t1 t1ce t2 t1ce,flair
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

from bench_proc import write_doc
from bench_representation import REPO, SHARED, run

from ssl_med.commands import thread_overrides

CASE = "brats2020_sample/BraTS20_Training_001"
SEQUENCES = ("t1", "t1ce", "t2", "flair")
OBJECTIVES = {
    "mae": "MAE (4-channel ViT)",
    "bm_mae": "BM-MAE (per-modality ViT)",
    "hi_end_mae": "Hi-End-MAE (4-channel ViT)",
    "voco": "VoCo (4-channel ViT)",
    "dino": "DINO (4-channel ViT, EMA teacher)",
    "graph_matching": "Graph matching (4-channel ViT)",
}
# Objective-specific pretraining overrides, the settings of the table in docs/results.md. VoCo's data crop
# is the region it cuts into base crops: a 32x64x64 region on a 2x2 grid gives four 32^3 bases, the encoder
# input of every other row. MAE reconstructs raw intensities (as recipe=small_3d's MAE: per-patch
# normalised targets discard a patch's brightness, which is what a tumour is in FLAIR and T1ce);
# Hi-End-MAE runs with VesselMNIST3D's batch and learning rate, graph matching with recipe=small_3d's
# (batch 32, so each sub-graph of 10 images is drawn from one batch; learning rate 3e-4).
OBJECTIVE_OVERRIDES = {
    "voco": ("data.crop_size=[32,64,64]", "objective.grid=[2,2]"),
    "mae": ("objective.norm_pix_loss=false",),
    "hi_end_mae": ("data.batch_size=32", "optim.lr=1.5e-3"),
    "graph_matching": ("data.batch_size=32", "optim.lr=3e-4"),
}
BEGIN, END = "<!-- brats:begin -->", "<!-- brats:end -->"
#: ``--modes``: ``eval.mode`` -> (evaluation folder prefix, row label suffix)
MODES = {"frozen": ("seg", ""), "finetune": ("segft", ", fine-tuned with the decoder")}


def pretrain_command(
    store: Path, objective: str, seed: int, steps: int, run_dir: Path, overrides: Sequence[str] = ()
) -> list[str]:
    """``ssl_med pretrain`` of ``objective`` on the 4-sequence store: 32^3 crops, patch 8, foreground-biased;
    ``overrides`` (``key=value``) come last, so they win."""
    return [
        "ssl_med", "pretrain", "backbone=vit", f"objective={objective}", "data=store", f"data.store={store}",
        "data.spatial_dims=3", "data.num_channels=4", f"data.channels=[{','.join(SEQUENCES)}]",
        "data.crop_size=[32,32,32]", "data.patch_size=8", "data.batch_size=8", "data.min_foreground=0.3",
        "data.channel_dropout=0.25", "data.num_workers=1", f"trainer.max_steps={steps}",
        f"trainer.checkpoint_every_n_steps={steps}", "trainer.preview_every_n_steps=0", "trainer.progress_bar=false",
        "resume=never", f"seed={seed}", "optim.warmup_steps=0.1", f"experiment=brats-{objective}-s{seed}",
        f"hydra.run.dir={run_dir}", *OBJECTIVE_OVERRIDES.get(objective, ()), *overrides,
    ]


def subset_key(subset: list[str]) -> str:
    """The evaluator's name of a channel subset (``t1ce+flair``)."""
    return "+".join(subset)


def dice_by_subset(seed_dir: Path, objective: str, mode: str = "frozen") -> dict[str, dict[str, float]]:
    """``{subset: {"pretrained": Dice, "random-init": Dice}}`` over every evaluation of ``objective`` in ``mode``
    (``seg-<objective>*``, ``segft-<objective>*``)."""
    found: dict[str, dict[str, float]] = {}
    for results in sorted(seed_dir.glob(f"{MODES[mode][0]}-{objective}*/results.json")):
        for row in json.loads(results.read_text())["rows"]:
            for key, value in row["metrics"].items():
                if key.endswith("/dice_mean"):
                    found.setdefault(key.removesuffix("/dice_mean"), {})[row["encoder"]] = value
    return found


def one_seed(
    out: Path, store: Path, objective: str, seed: int, steps: int, subsets: list[list[str]], overrides: Sequence[str] = (),
    mode: str = "frozen",
) -> None:
    """Pretrain (if not done) and evaluate, in ``mode``, the subsets not yet evaluated for one objective and seed."""
    seed_dir = out / f"brats-s{seed}"
    run_dir = seed_dir / objective
    seed_dir.mkdir(parents=True, exist_ok=True)
    if not (run_dir / "encoder" / "config.json").is_file():
        seconds = run(pretrain_command(store, objective, seed, steps, run_dir, overrides), seed_dir / f"{objective}.pretrain.log")
        print(f"  pretrained {objective} seed {seed} in {seconds / 60:.1f} min", flush=True)
    done = dice_by_subset(seed_dir, objective, mode)
    missing = [s for s in subsets if subset_key(s) not in done]
    if not missing:
        return
    prefix = f"{MODES[mode][0]}-{objective}"
    eval_dir = seed_dir / f"{prefix}-{len(list(seed_dir.glob(f'{prefix}*')))}"
    listed = ",".join(f"[{','.join(s)}]" for s in missing)
    seconds = run(
        ["ssl_med", "evaluate", "eval=segmentation", f"checkpoint={run_dir}", "eval_data=brats",
         f"eval_data.modalities=[{','.join(SEQUENCES)}]", f"eval.channel_subsets=[{listed}]", f"seed={seed}",
         f"eval.mode={mode}", "eval.overlays=0", f"hydra.run.dir={eval_dir}", *thread_overrides(overrides)],
        seed_dir / f"{eval_dir.name}.log",
    )
    print(f"  evaluated {objective} seed {seed} ({mode}) on {len(missing)} subset(s) in {seconds / 60:.1f} min", flush=True)


def mean_std(values: list[float]) -> str:
    """``mean ± std`` over seeds; one seed's value alone (a spread of one is not zero)."""
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


def table(out: Path, seeds: list[int], subsets: list[list[str]]) -> str:
    """Markdown rows objective x mode x subset: pretrained and random-init mean Dice, their gap, per seed."""
    lines = [
        "| objective | sequences | seeds | pretrained mean Dice | random-init mean Dice | gap | per seed |",
        "|---|---|---|---|---|---|---|",
    ]
    for (objective, label), (mode, (_, suffix)) in itertools.product(OBJECTIVES.items(), MODES.items()):
        per_seed = {s: dice_by_subset(out / f"brats-s{s}", objective, mode) for s in seeds}
        for subset in subsets:
            key = subset_key(subset)
            have = [s for s in seeds if {"pretrained", "random-init"} <= per_seed[s].get(key, {}).keys()]
            if not have:
                continue
            pre = [per_seed[s][key]["pretrained"] for s in have]
            rnd = [per_seed[s][key]["random-init"] for s in have]
            gaps = [p - r for p, r in zip(pre, rnd)]
            name = "all four" if sorted(subset) == sorted(SEQUENCES) else key
            lines.append(
                f"| {label}{suffix} | {name} | {','.join(map(str, have))} | {mean_std(pre)} | {mean_std(rnd)} | "
                f"**{mean_std(gaps)}** | {', '.join(f'{g:+.3f}' for g in gaps)} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--objectives", nargs="+", default=list(OBJECTIVES), choices=list(OBJECTIVES))
    parser.add_argument("--subsets", nargs="+", default=[",".join(SEQUENCES), "flair"],
                        help="sequence subsets, each comma-separated (t1ce,flair)")
    parser.add_argument("--steps", type=int, default=300, help="pretraining steps per run")
    parser.add_argument("--modes", nargs="+", default=["frozen"], choices=list(MODES),
                        help="eval.mode of the segmentation transfer: frozen encoder, or fine-tuned with the decoder")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench_brats")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "results.md", help="markdown file to update")
    parser.add_argument("--cached-only", action="store_true", help="build the table from finished evaluations only")
    parser.add_argument("overrides", nargs="*", help="extra ssl_med pretrain overrides (key=value) for every run, e.g. "
                        "data.batch_size=32 optim.lr=1.5e-3; give them their own --out (num_threads=N applies to the "
                        "evaluations too)")
    args = parser.parse_args(argv)
    subsets = [s.split(",") for s in args.subsets]
    unknown = sorted({c for s in subsets for c in s} - set(SEQUENCES))
    if unknown:
        parser.error(f"unknown sequence(s) {unknown} in --subsets; choose from {list(SEQUENCES)}")
    case = SHARED / CASE
    if not case.is_dir():
        print(f"BraTS case not found at {case} (set SSL_MED_SHARED_DATA)", file=sys.stderr)
        return 2
    store = args.out / "brats2mm.zarr"
    if not args.cached_only:
        args.out.mkdir(parents=True, exist_ok=True)
        # a no-op on a finished store, the rest of an interrupted one
        run(["ssl_med", "ingest", str(case), "--out", str(store), "--spacing", "2", "2", "2", "--no-progress"],
            args.out / "ingest.log")
        for seed in args.seeds:
            for objective in args.objectives:
                print(f"[{objective} / seed {seed}]", flush=True)
                for mode in args.modes:
                    one_seed(args.out, store, objective, seed, args.steps, subsets, args.overrides, mode)
    body = table(args.out, args.seeds, subsets)
    write_doc(args.doc, body, BEGIN, END)
    print(body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
