"""In-domain representation benchmark: do pretrained encoders beat random init on real labelled data?

For each dataset, objective and seed, the documented workflow is run with the command-line tools a
user runs (nothing is called behind their back):

1. ``ssl_med ingest <file>.npz`` — the MedMNIST file becomes a store that keeps its splits;
2. ``ssl_med pretrain recipe=<small_2d|small_3d> objective=<o> seed=<s> data=store ...`` — pretraining
   on the **train** split only (``data.split=auto``) with the online kNN / ridge-probe curve on **val**;
3. ``ssl_med evaluate eval=linear_probe`` and ``eval=knn`` with ``seed=<s>`` — the pretrained encoder
   (the last step's) and a random-init encoder of the same seed, probe C chosen on val, scored once on
   test; plus the linear probe of ``encoder_best/``, the encoder the online val curve selected;
4. with ``--finetune``, ``ssl_med evaluate eval=finetune`` on the last step's encoder and its random-init
   twin (each fine-tuned over the same (LR, layer decay) grid, the best on val scored once on test); with
   ``--finetune lpft``, ``eval=lpft`` instead: from a linear-probe head (LP-FT: read-out and ``C`` of the
   probe chosen on val, the probe itself a candidate at step 0);
5. with ``--label-fractions 0.01 0.1``, the linear probe of the same two encoders on that fraction of the
   training labels (three stratified draws each; read-out and C chosen on val per draw, the probe fitted
   on the drawn labels alone): where self-supervision is meant to pay, few labels.

The table (mean ± std over seeds, gap = pretrained − random init per seed) and the online curves are
written to ``--doc`` between ``<!-- in-domain:begin -->`` and ``<!-- in-domain:end -->``, and to
``<out>/in_domain.md``; runs that exist are reused, so an interrupted benchmark continues::

    python scripts/bench_representation.py --datasets breastmnist --objectives mae dino --seeds 0 1 2

``--jobs N`` runs N of them at once (give each its share of the cores: ``num_threads=1
data.num_workers=1`` for two jobs on two cores; ``num_threads`` applies to the evaluations as well);
they share one store per dataset, written by one ingest at a time.

``--datasets`` takes the built-in names (the files in the shared data folder, with their published
rows) or the path of any MedMNIST-style ``.npz`` of your own: it is ingested, pretrained on with
``recipe=small_2d`` or ``small_3d`` (from its image arrays) and evaluated through
``eval_data=medmnist eval_data.path=<file>``, named after the file::

    python scripts/bench_representation.py --datasets /data/dermamnist.npz --objectives graph_matching --label-fractions 0.01 0.1
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from bench_proc import write_doc
from bench_tables import (
    BEGIN,
    END,
    finetune_table,
    has_fractions,
    label_efficiency_table,
    pixel_table,
    plot_curves,
    plot_label_efficiency,
    table,
)
from omegaconf import OmegaConf

from ssl_med.commands import apply_num_threads, thread_overrides

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("SSL_MED_SHARED_DATA", REPO.parent / "shared" / "data"))


@dataclass(frozen=True)
class Dataset:
    """A labelled set to pretrain on (its train split) and evaluate on."""

    file: Path
    recipe: str        # small_2d | small_3d
    eval_group: str    # the eval_data group
    path: str | None = None  # eval_data.path (the generic ``medmnist`` group)
    evaluate_overrides: tuple[str, ...] = ()  # every evaluation's too (the job's ``num_threads``)

    @property
    def path_overrides(self) -> list[str]:
        """The ``eval_data`` group's overrides (its file, for the generic group)."""
        return [f"eval_data.path={self.path}"] if self.path else []

    @property
    def evaluate_args(self) -> list[str]:
        """``ssl_med evaluate`` overrides that select this set."""
        return [f"eval_data={self.eval_group}", *self.path_overrides, *self.evaluate_overrides]

    @property
    def online_args(self) -> list[str]:
        """``ssl_med pretrain`` overrides that put its val split on the online curve."""
        return [f"online_eval.data={self.eval_group}", *([f"online_eval.path={self.path}"] if self.path else [])]


BUILTIN = {
    "breastmnist": Dataset(SHARED / "medmnist/breastmnist.npz", "small_2d", "breastmnist"),
    "pneumoniamnist": Dataset(SHARED / "medmnist/pneumoniamnist_subset.npz", "small_2d", "pneumoniamnist"),
    "vesselmnist3d": Dataset(SHARED / "medmnist/vesselmnist3d.npz", "small_3d", "vesselmnist3d"),
}


def dataset(name_or_file: str) -> tuple[str, Dataset]:
    """``(name, Dataset)`` for a built-in name or a MedMNIST-style ``.npz`` (2D or 3D read from the file)."""
    if name_or_file in BUILTIN:
        if not BUILTIN[name_or_file].file.is_file():
            print(f"{name_or_file}: not found in {SHARED} (set SSL_MED_SHARED_DATA)", file=sys.stderr)
            raise SystemExit(2)
        return name_or_file, BUILTIN[name_or_file]
    file = Path(name_or_file).resolve()
    if file.suffix != ".npz" or not file.is_file():
        raise SystemExit(f"--datasets {name_or_file}: neither one of {sorted(BUILTIN)} nor an existing .npz file")
    from ssl_med.evaluators.datasets import eval_data_config, resolve_eval_data

    cfg = resolve_eval_data(eval_data_config("medmnist", [f"eval_data.path={file}"]))  # fails early on a bad file
    return file.stem, Dataset(file, f"small_{cfg['spatial_dims']}d", "medmnist", str(file))


def run(cmd: list[str], log: Path) -> float:
    """Run ``cmd`` (output to ``log``); returns its wall time; raises with the log's tail on failure."""
    start = time.perf_counter()
    with log.open("w") as f:
        code = subprocess.call(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=REPO)
    if code:
        tail = "\n".join(log.read_text().splitlines()[-20:])
        raise RuntimeError(f"{' '.join(cmd)} failed ({code}); last lines of {log}:\n{tail}")
    return time.perf_counter() - start


def online_curve(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    """``[(step, value)]`` of ``tag`` from the run's TensorBoard events, one value per step: where a resumed
    run repeated steps (one event file per process), the value written last is the run's."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    if tag not in events.Tags()["scalars"]:
        return []
    last = {e.step: e.value for e in sorted(events.Scalars(tag), key=lambda e: e.wall_time)}
    return sorted(last.items())


def with_geometry(row: dict, run_dir: Path) -> dict:
    """``row`` with the patch size, crop size and encoder input size its run trained at (from the run's
    resolved config). The input size is what the evaluators and the raw-pixel probe read; it differs from
    the crop where an objective cuts its views out of the crop (VoCo's region holds four bases)."""
    if "input_size" not in row and (run_dir / "resolved_config.yaml").is_file():
        resolved = OmegaConf.load(run_dir / "resolved_config.yaml")
        row["patch_size"], row["crop_size"] = int(resolved.data.patch_size), int(resolved.data.crop_size[0])
        row["input_size"] = int(resolved.backbone.img_size[0])
    return row


def one_run(
    out: Path, name: str, spec: Dataset, objective: str, backbone: str, seed: int, steps: int, overrides: list[str],
    cached_only: bool = False, re_evaluate: bool = False, finetune: str | None = None,
    label_fractions: list[float] | None = None,
) -> dict | None:
    """Pretrain + evaluate one (dataset, objective, backbone, seed); cached in ``<out>/<key>/row.json``
    (a finished pretraining in ``pretrain.json``, so ``re_evaluate`` redoes only the evaluations)."""
    key = f"{name}-{backbone}-{objective}-s{seed}"
    folder = out / key
    row_file = folder / "row.json"
    done_file = folder / "pretrain.json"  # a finished pretraining: evaluations may be redone without it
    if row_file.is_file() and not done_file.is_file() and not cached_only:  # rows written before pretrain.json existed
        old = json.loads(row_file.read_text())
        done_file.write_text(json.dumps({k: old[k] for k in ("pretrain_s", "command")}))
    if row_file.is_file() and not re_evaluate:
        row = json.loads(row_file.read_text())
        missing_finetune = finetune is not None and f"{finetune}/pretrained" not in row
        missing_fractions = label_fractions and not has_fractions(row, label_fractions)
        if (missing_finetune or missing_fractions) and not cached_only:
            if missing_finetune:
                row.update(finetune_rows(folder, spec, seed, finetune))
            if missing_fractions:
                row.update(label_efficiency_rows(folder, spec, seed, label_fractions))
            row_file.write_text(json.dumps(row, indent=1))
        return with_geometry(row, folder / "run")
    if cached_only:
        print(f"  not run yet: {key} (--cached-only)", flush=True)
        return None
    folder.mkdir(parents=True, exist_ok=True)
    store = out / "stores" / f"{name}.zarr"
    store.parent.mkdir(parents=True, exist_ok=True)
    # every run ingests: a no-op on a finished store ("already in the store"), the rest of an interrupted one;
    # runs started together (--jobs) wait for the store's one writer (ssl_med.data.writer_lock)
    run(["ssl_med", "ingest", str(spec.file), "--out", str(store), "--no-progress"], folder / "ingest.log")
    run_dir = folder / "run"
    pretrain = [
        "ssl_med", "pretrain", f"recipe={spec.recipe}", f"objective={objective}", f"backbone={backbone}",
        "data=store", f"data.store={store}", f"seed={seed}", f"trainer.max_steps={steps}",
        *spec.online_args, "trainer.progress_bar=false", "resume=never",
        f"experiment={key}", f"hydra.run.dir={run_dir}", *overrides,
    ]
    if done_file.is_file():
        done = json.loads(done_file.read_text())
    else:
        done = {"pretrain_s": round(run(pretrain, folder / "pretrain.log"), 1), "command": " ".join(pretrain)}
        done_file.write_text(json.dumps(done))
    row = {"dataset": name, "objective": objective, "backbone": backbone, "seed": seed, "steps": steps, **done}
    # which encoder "last step" is: DINO's EMA teacher for runs since 2026-12-01, its student before (rows without it)
    row["encoder_weights"] = json.loads((run_dir / "encoder" / "config.json").read_text()).get("exported_weights", "student")
    for evaluator in ("linear_probe", "knn"):
        eval_dir = folder / f"eval-{evaluator}"
        run(["ssl_med", "evaluate", f"eval={evaluator}", f"checkpoint={run_dir}", *spec.evaluate_args,
             f"seed={seed}", "eval.label_fractions=[]" if evaluator == "linear_probe" else "eval.k=20",
             f"hydra.run.dir={eval_dir}"], folder / f"{evaluator}.log")
        results = json.loads((eval_dir / "results.json").read_text())
        for r in results["rows"]:
            row[f"{evaluator}/{r['encoder']}"] = r["metrics"]
            if evaluator == "linear_probe":
                row[f"readout/{r['encoder']}"] = r["details"].get("features")
    best_dir = run_dir / "encoder_best"
    if best_dir.is_dir():  # the encoder selected on the online val curve (online_eval.keep_best)
        eval_dir = folder / "eval-linear_probe-best"
        run(["ssl_med", "evaluate", "eval=linear_probe", f"checkpoint={best_dir}", *spec.evaluate_args,
             f"seed={seed}", "eval.label_fractions=[]", "baseline=false", f"hydra.run.dir={eval_dir}"], folder / "best.log")
        results = json.loads((eval_dir / "results.json").read_text())
        row["linear_probe/best-on-val"] = results["rows"][0]["metrics"]
        row["best_step"] = json.loads((best_dir / "config.json").read_text())["selected_on"]["step"]
    for tag in ("online/knn_auroc", "online/linear_auroc"):
        row[tag] = online_curve(run_dir, tag)
    if finetune is not None:
        row.update(finetune_rows(folder, spec, seed, finetune))
    if label_fractions:
        row.update(label_efficiency_rows(folder, spec, seed, label_fractions))
    row = with_geometry(row, run_dir)
    row_file.write_text(json.dumps(row, indent=1))
    return row


#: ``--finetune`` recipes: row-key prefix -> ``ssl_med evaluate`` arguments. ``lpft_folded`` is the LP-FT
#: recipe before ``eval=lpft`` (the probe's standardisation folded into the head, the head at 1e-3, no warm-up),
#: kept so the rows measured with it can be re-created, as is ``finetune_unnormed``, the random-head recipe before
#: ``eval=finetune`` put a BatchNorm in front of its head (the rows measured with it before 2026-12-03 are kept under
#: its key, ``finetune_unnormed``).
FINETUNE_RECIPES = {
    "finetune": ["eval=finetune"],
    "finetune_unnormed": ["eval=finetune", "eval.head_norm=none"],
    "lpft": ["eval=lpft"],
    "lpft_folded": ["eval=finetune", "eval.head_init=probe", "eval.head_norm=none",
                    "eval.features=[pooled,mean_patch,pooled+mean_patch]"],
}


def finetune_rows(folder: Path, spec: Dataset, seed: int, recipe: str = "finetune") -> dict:
    """``ssl_med evaluate`` with ``FINETUNE_RECIPES[recipe]`` of ``<folder>/run`` (last step)
    and its random-init twin: ``{<recipe>/<encoder>: test metrics, <recipe>_choice/<encoder>: the (read-out, lr,
    layer_decay, step) chosen on val}``."""
    eval_dir = folder / f"eval-{recipe}"
    run(["ssl_med", "evaluate", *FINETUNE_RECIPES[recipe], f"checkpoint={folder / 'run'}", *spec.evaluate_args, f"seed={seed}", f"hydra.run.dir={eval_dir}"], folder / f"{recipe}.log")
    results = json.loads((eval_dir / "results.json").read_text())
    out = {}
    for r in results["rows"]:
        out[f"{recipe}/{r['encoder']}"] = r["metrics"]
        out[f"{recipe}_choice/{r['encoder']}"] = r["details"]["chosen"]
    return out


def label_efficiency_rows(folder: Path, spec: Dataset, seed: int, fractions: list[float]) -> dict:
    """``ssl_med evaluate eval=linear_probe eval.label_fractions=[...]`` of ``<folder>/run`` (last step) and its
    random-init twin: ``{label_efficiency/<encoder>: {fraction: {metric: [mean, std, draws]}},
    label_efficiency_features/<encoder>: {fraction: [read-out chosen per draw]}}`` (read-out and ``C`` chosen
    on val for each draw of labels, the probe fitted on the drawn labels alone)."""
    eval_dir = folder / "eval-label-efficiency"
    run(["ssl_med", "evaluate", "eval=linear_probe", f"checkpoint={folder / 'run'}", *spec.evaluate_args,
         f"seed={seed}", f"eval.label_fractions=[{','.join(map(str, fractions))}]", f"hydra.run.dir={eval_dir}"],
        folder / "label_efficiency.log")
    out = {}
    for r in json.loads((eval_dir / "results.json").read_text())["rows"]:
        out[f"label_efficiency/{r['encoder']}"] = r["details"]["label_efficiency"]
        out[f"label_efficiency_features/{r['encoder']}"] = r["details"]["label_efficiency_features"]
    return out


def pixel_probe(out: Path, name: str, spec: Dataset, image_size: int, fractions: list[float] | None = None) -> dict:
    """The linear probe of ``conf/eval/linear_probe.yaml`` (its C grid and ``select_on``) on raw pixels
    (no encoder) at the encoders' input size: what a linear read-out of the images alone reaches; with
    ``fractions``, also its label-efficiency curve (``label_efficiency``: the encoders' protocol, draws
    0, 1, 2). Cached in ``<out>/pixels-<name>-<size>-<select_on>.json``."""
    probe = OmegaConf.load(REPO / "conf" / "eval" / "linear_probe.yaml")
    cache = out / f"pixels-{name}-{image_size}-{probe.select_on}.json"
    row = json.loads(cache.read_text()) if cache.is_file() else None
    missing = [f for f in fractions or [] if str(f) not in (row or {}).get("label_efficiency", {})]
    if row is not None and not missing:
        return row
    from ssl_med.evaluators.datasets import eval_data_config, load_eval_data, resolve_eval_data
    from ssl_med.evaluators.linear_probe import fit_logistic, label_efficiency
    from ssl_med.evaluators.readout import select_readout

    cfg = resolve_eval_data({**eval_data_config(spec.eval_group, spec.path_overrides), "image_size": image_size})
    data = load_eval_data(cfg)
    feats = {"pixels": {split: x.flatten(1).numpy() for split, x in data.images.items()}}
    if row is None:
        choice = select_readout(
            feats, data.labels, data.task, list(probe.C), probe.select_metric,
            lambda x, y, c: fit_logistic(x, y, c, data.task, probe.max_iter), probe.select_on, probe.cv_folds,
        )
        row = {"dataset": name, "image_size": image_size, "C": choice.C, "select_on": probe.select_on, **choice.test}
    if missing:
        cfg = {**OmegaConf.to_container(probe), "label_fractions": missing}
        curve, _ = label_efficiency(feats, data, cfg, seed=0)
        row["label_efficiency"] = {**row.get("label_efficiency", {}), **curve}
    cache.write_text(json.dumps(row, indent=1))
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--datasets", nargs="+", default=["breastmnist"], metavar="NAME|FILE.npz",
                        help=f"built-in: {', '.join(sorted(BUILTIN))}; or a MedMNIST-style .npz of your own")
    parser.add_argument("--objectives", nargs="+", default=["mae", "dino"])
    parser.add_argument("--backbone", default="vit")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=500, help="pretraining steps per run (equal budget)")
    parser.add_argument("--out", type=Path, default=REPO / "outputs" / "bench_representation")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "results.md", help="markdown file to update")
    parser.add_argument("--cached-only", action="store_true", help="build the table from finished runs only")
    parser.add_argument("--re-evaluate", action="store_true", help="redo the evaluations of finished pretraining runs")
    parser.add_argument("--finetune", nargs="?", const="finetune", choices=sorted(FINETUNE_RECIPES), default=None,
                        help="also fine-tune every last-step encoder and its random-init twin: from a random head "
                        "(default), with 'lpft' (eval=lpft) from a linear probe whose read-out and C are chosen on val, "
                        "with 'lpft_folded' by the earlier LP-FT recipe")
    parser.add_argument("--label-fractions", nargs="+", type=float, default=None, metavar="F",
                        help="also probe every last-step encoder and its random-init twin on these fractions of the "
                        "training labels (e.g. 0.01 0.1; three draws each, read-out and C chosen on val per draw)")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs (dataset, objective, seed) at once, each in its own processes; give each a share "
                        "of the cores with the overrides, e.g. --jobs 2 num_threads=1 data.num_workers=1 on 2 cores")
    parser.add_argument("overrides", nargs="*", help="extra ssl_med pretrain overrides (key=value, anywhere on the "
                        "line) for every run")
    argv = sys.argv[1:] if argv is None else argv
    # key=value tokens are pretrain overrides wherever they stand, so a list option before them ends where they start
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    args = parser.parse_args([a for a in argv if a not in overrides])
    args.overrides = overrides
    # the evaluations run as each job's pretraining does: num_threads=1 keeps --jobs N from oversubscribing the
    # cores with BLAS threads (the linear probe's fits; ssl_med.commands.apply_num_threads)
    threads = thread_overrides(overrides)
    datasets = {name: replace(spec, evaluate_overrides=threads) for name, spec in map(dataset, args.datasets)}
    if threads:  # and so do the raw-pixel probes, fitted in this process
        apply_num_threads(OmegaConf.from_dotlist([threads[-1]]))
    def one(job: tuple[str, Dataset, str, int]) -> dict | None:
        name, spec, objective, seed = job
        print(f"[{name} / {objective} / seed {seed}]", flush=True)
        return one_run(args.out, name, spec, objective, args.backbone, seed, args.steps, args.overrides, args.cached_only,
                       args.re_evaluate, args.finetune, args.label_fractions)

    jobs = [(name, spec, objective, seed) for name, spec in datasets.items() for objective in args.objectives for seed in args.seeds]
    with ThreadPoolExecutor(max(1, args.jobs)) as pool:  # threads: the work runs in each job's subprocesses
        rows = [row for row in pool.map(one, jobs) if row is not None]  # in job order, whatever finishes first
    if not rows:
        print("no finished runs: nothing to tabulate", file=sys.stderr)
        return 1
    run_steps = {row["steps"] for row in rows}  # the finished runs' budget, not the flag's default (--cached-only)
    steps = run_steps.pop() if len(run_steps) == 1 else args.steps
    pixels = []
    for name, spec in datasets.items():
        sizes = sorted({r.get("input_size", r.get("crop_size")) for r in rows if r["dataset"] == name} - {None})
        pixels += [pixel_probe(args.out, name, spec, size, args.label_fractions) for size in sizes]
    curves = args.doc.parent / "benchmarks" / "online_curves.png"
    plot_curves(rows, curves)
    finetuned = finetune_table(rows, args.finetune or "finetune")
    few_labels = label_efficiency_table(rows, args.label_fractions, pixels) if args.label_fractions else ""
    if few_labels:
        tag = f"{'-'.join(datasets)}_{args.backbone}_{steps}"
        few_plot = args.doc.parent / "benchmarks" / f"label_efficiency_{tag}.png"
        plot_label_efficiency(rows, args.label_fractions, pixels, few_plot)
        few_labels += f"\n\n![label efficiency]({few_plot.relative_to(args.doc.parent).as_posix()})"
    body = (
        f"{table(rows)}\n\n"
        + (f"Fine-tuned end to end (`{' '.join(FINETUNE_RECIPES[args.finetune or 'finetune'])}`, "
           f"the last step's encoders):\n\n{finetuned}\n\n" if finetuned else "")
        + (f"Linear probe on a fraction of the training labels (`eval.label_fractions`, last step's encoders):\n\n{few_labels}\n\n" if few_labels else "")
        + f"The same probe on the raw pixels (no encoder), for scale:\n\n{pixel_table(pixels)}\n\nOnline curves (val split, step 0 = random init; the ridge-probe curve selects "
        f"`encoder_best/`): "
        f"![online curves]({curves.relative_to(args.doc.parent).as_posix()})\n\n"
        f"Command: `python scripts/bench_representation.py --datasets {' '.join(args.datasets)} "
        f"--objectives {' '.join(args.objectives)}"
        + (f" --backbone {args.backbone}" if args.backbone != "vit" else "")
        + f" --seeds {' '.join(map(str, args.seeds))} --steps {steps}"
        + (f" --label-fractions {' '.join(map(str, args.label_fractions))}" if args.label_fractions else "")
        + (f" --finetune{'' if args.finetune == 'finetune' else ' ' + args.finetune}" if args.finetune else "")
        + (f" {' '.join(args.overrides)}" if args.overrides else "") + "`"
    )
    if not args.cached_only:  # a kept rows folder is read, never written
        (args.out / "in_domain.md").write_text(body + "\n")
    write_doc(args.doc, body, BEGIN, END)
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
