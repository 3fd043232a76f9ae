"""Tables and plots of the in-domain representation benchmark (``bench_representation.py``): one row per
(dataset, backbone, objective) with mean ± std over seeds and the gap to the random-init twins per seed."""

from __future__ import annotations

import statistics
import sys
from collections.abc import Callable
from pathlib import Path

from bench_proc import write_doc

from ssl_med.evaluators.plots import save_figure


def has_fractions(row: dict, fractions: list[float]) -> bool:
    """Whether ``row`` holds the label-efficiency probes of every fraction in ``fractions``."""
    done = row.get("label_efficiency/pretrained", {})
    return all(str(f) in done for f in fractions)


def pixel_table(rows: list[dict]) -> str:
    lines = ["| data | input | probe C (chosen without test) | probe AUROC | probe ACC |", "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['dataset']} | raw pixels at {r['image_size']} px | {r['C']:g} | {r['auroc']:.3f} | {r['accuracy']:.3f} |")
    return "\n".join(lines)


def mean_std(values: list[float]) -> str:
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f} ± {statistics.stdev(values):.3f}"


# overrides that set how a run uses the machine or is watched, not what it learns: rows that differ only in
# these are one group (keys, and whole groups by prefix)
NOT_LEARNING_KEYS = frozenset({"num_threads", "data.num_workers", "trainer.progress_bar"})
NOT_LEARNING_GROUPS = ("online_eval.",)


def variant(row: dict) -> str:
    """The extra pretraining overrides a row's run was given on the benchmark's command line (those after
    ``hydra.run.dir=``, less the :data:`NOT_LEARNING_KEYS` and :data:`NOT_LEARNING_GROUPS`), e.g.
    ``objective.norm_pix_loss=false``; ``""`` for the recipe as shipped or a row without its command."""
    args = row.get("command", "").split()
    start = next((i + 1 for i, a in enumerate(args) if a.startswith("hydra.run.dir=")), len(args))
    learning = []
    for arg in args[start:]:
        key = arg.split("=", 1)[0].lstrip("+~")
        if key not in NOT_LEARNING_KEYS and not key.startswith(NOT_LEARNING_GROUPS):
            learning.append(arg)
    return " ".join(learning)


def group_rows(rows: list[dict], *fields: str, keep: Callable[[dict], bool] = lambda r: True) -> dict[tuple, list[dict]]:
    """The rows that ``keep`` accepts, grouped by the values of ``fields`` (``patch_size`` may be missing: ``?``;
    ``variant`` is :func:`variant`) and sorted by them."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        if keep(r):
            key = tuple(variant(r) if f == "variant" else r.get(f, "?") for f in fields)
            groups.setdefault(key, []).append(r)
    return dict(sorted(groups.items()))


def encoder_label(backbone: str, patch: object, objective: str, extra: str = "") -> str:
    """``vit-tiny/8 mae`` (``, objective.norm_pix_loss=false`` appended for a :func:`variant`)."""
    return f"{backbone}-tiny/{patch} {objective}" + (f", {extra}" if extra else "")


SHORT = {"pooled": "cls", "mean_patch": "mp", "pooled+mean_patch": "cls+mp", "patch_tokens": "tok"}


def readouts(rows: list[dict]) -> str:
    """The read-out each linear probe chose per seed, e.g. ``mp,mp,cls; cls+mp,mp,mp`` (``-``: not recorded)."""
    def chosen(key: str) -> str:
        return ",".join(SHORT.get(r.get(f"readout/{key}", ""), "-") for r in rows)
    return f"{chosen('pretrained')}; {chosen('random-init')}"


def table(rows: list[dict]) -> str:
    """Markdown: one line per (dataset, backbone, objective) and one random-init line per dataset."""
    lines = [
        "| data | encoder/patch | seeds | steps | pretrain min | probe AUROC (last step) | random-init probe AUROC | gap "
        "| probe AUROC, encoder selected on val (step) | its gap | kNN ACC | random-init kNN ACC | kNN gap "
        "| read-outs chosen (pretrained; random-init) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for (data, backbone, objective, patch, extra), rs in group_rows(rows, "dataset", "backbone", "objective", "patch_size", "variant").items():
        auc = [r["linear_probe/pretrained"]["auroc"] for r in rs]
        auc0 = [r["linear_probe/random-init"]["auroc"] for r in rs]
        knn = [r["knn/pretrained"]["accuracy"] for r in rs]
        knn0 = [r["knn/random-init"]["accuracy"] for r in rs]
        gaps = [a - b for a, b in zip(auc, auc0)]
        selected = [r for r in rs if "linear_probe/best-on-val" in r]
        best = [r["linear_probe/best-on-val"]["auroc"] for r in selected]
        best_gaps = [r["linear_probe/best-on-val"]["auroc"] - r["linear_probe/random-init"]["auroc"] for r in selected]
        best_cell = f"{mean_std(best)} ({','.join(str(r['best_step']) for r in selected)}) | **{mean_std(best_gaps)}**" if best else "- | -"
        lines.append(
            f"| {data} | {encoder_label(backbone, patch, objective, extra)} | {','.join(str(r['seed']) for r in rs)} | {rs[0]['steps']} | "
            f"{statistics.mean(r['pretrain_s'] for r in rs) / 60:.1f} | {mean_std(auc)} | {mean_std(auc0)} | "
            f"**{mean_std(gaps)}** | {best_cell} | {mean_std(knn)} | {mean_std(knn0)} | "
            f"{mean_std([a - b for a, b in zip(knn, knn0)])} | {readouts(rs)} |"
        )
    return "\n".join(lines)


def label_efficiency_table(rows: list[dict], fractions: list[float], pixels: list[dict] | None = None) -> str:
    """Markdown: linear-probe test AUROC on a fraction of the training labels (each seed: the mean over its
    draws of labels), pretrained (last step) beside its random-init twin and the raw-pixel probe of the
    same dataset (``pixel_probe`` rows with ``label_efficiency``), per group and fraction."""
    lines = [
        "| data | encoder/patch | seeds | labels | probe AUROC | random-init probe AUROC | gap | per seed | raw pixels "
        "| read-outs chosen (pretrained; random-init) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    on_pixels = {(p["dataset"], f): v["auroc"] for p in pixels or [] for f, v in p.get("label_efficiency", {}).items()}
    groups = group_rows(rows, "dataset", "backbone", "objective", "patch_size", "steps", "variant", keep=lambda r: has_fractions(r, fractions))
    for (data, backbone, objective, patch, steps, extra), rs in groups.items():
        for f in fractions:
            auc = [r["label_efficiency/pretrained"][str(f)]["auroc"][0] for r in rs]
            auc0 = [r["label_efficiency/random-init"][str(f)]["auroc"][0] for r in rs]
            gaps = [a - b for a, b in zip(auc, auc0)]
            chosen = "; ".join(
                " ".join(",".join(SHORT.get(m, m) for m in r[f"label_efficiency_features/{e}"][str(f)]) for r in rs)
                for e in ("pretrained", "random-init")
            )
            pixel = on_pixels.get((data, str(f)))
            lines.append(
                f"| {data} | {encoder_label(backbone, patch, objective, extra)}, {steps} steps | {','.join(str(r['seed']) for r in rs)} | "
                f"{100 * f:g} % | {mean_std(auc)} | {mean_std(auc0)} | **{mean_std(gaps)}** | "
                f"{', '.join(f'{g:+.3f}' for g in gaps)} | {f'{pixel[0]:.3f} ± {pixel[1]:.3f}' if pixel else '-'} | {chosen} |"
            )
    return "\n".join(lines) if groups else ""


def finetune_table(rows: list[dict], recipe: str = "finetune") -> str:
    """Markdown: fine-tune test AUROC of the last-step encoders and their random-init twins under ``recipe``
    (the row-key prefix: a ``--finetune`` recipe of bench_representation), per group, with their balanced accuracy
    (0.5: the classifier predicts one class for every test image, whatever its AUROC) and what val chose per seed."""
    lines = [
        "| data | encoder/patch | seeds | fine-tune AUROC | random-init fine-tune AUROC | gap | balanced accuracy (pretrained; random-init) "
        "| chosen on val: read-out/lr/layer decay@step (pretrained; random-init) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    groups = group_rows(rows, "dataset", "backbone", "objective", "patch_size", "variant", keep=lambda r: f"{recipe}/pretrained" in r)
    for (data, backbone, objective, patch, extra), rs in groups.items():
        auc = [r[f"{recipe}/pretrained"]["auroc"] for r in rs]
        auc0 = [r[f"{recipe}/random-init"]["auroc"] for r in rs]
        chosen = "; ".join(
            ", ".join(_choice(r[f"{recipe}_choice/{e}"]) for r in rs) for e in ("pretrained", "random-init")
        )
        balanced = "; ".join(
            ", ".join(f"{r[f'{recipe}/{e}']['balanced_accuracy']:.2f}" if "balanced_accuracy" in r[f"{recipe}/{e}"] else "-" for r in rs)
            for e in ("pretrained", "random-init")
        )
        lines.append(
            f"| {data} | {encoder_label(backbone, patch, objective, extra)} | {','.join(str(r['seed']) for r in rs)} | {mean_std(auc)} | "
            f"{mean_std(auc0)} | **{mean_std([a - b for a, b in zip(auc, auc0)])}** | {balanced} | {chosen} |"
        )
    return "\n".join(lines) if groups else ""


def _choice(chosen: dict) -> str:
    """``{features, lr, layer_decay, step}`` chosen on val -> ``cls+mp/3e-05/0.75@200`` (``features`` absent in
    rows written before the fine-tuner chose read-outs)."""
    readout = SHORT.get(chosen.get("features", ""), "-")
    return f"{readout}/{chosen['lr']:g}/{chosen['layer_decay']:g}@{chosen['step']}"


def plot_curves(rows: list[dict], path: Path) -> None:
    """Online val kNN AUROC and ridge-probe AUROC vs step, one column per dataset, one line per run
    (step 0 = the run's random init)."""
    from matplotlib.figure import Figure

    datasets = sorted({r["dataset"] for r in rows})
    tags = ("online/knn_auroc", "online/linear_auroc")
    fig = Figure(figsize=(4.2 * len(datasets), 3.0 * len(tags)))
    axes = fig.subplots(len(tags), len(datasets), squeeze=False)
    for col, data in enumerate(datasets):
        for row, tag in enumerate(tags):
            ax = axes[row][col]
            for r in (r for r in rows if r["dataset"] == data):
                curve = r.get(tag) or []
                if curve:
                    ax.plot(*zip(*curve), marker=".", label=f"{r['objective']} s{r['seed']}")
            ax.set_title(f"{data}: {tag} (val)", fontsize=9)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    save_figure(fig, path)


def plot_label_efficiency(rows: list[dict], fractions: list[float], pixels: list[dict], path: Path) -> None:
    """Test AUROC against the fraction of training labels, one panel per (dataset, backbone, objective, steps):
    pretrained and random-init twins (mean ± std over seeds) and the raw-pixel probe (mean ± std over draws).
    The 100 % point is the table's probe (read-out and ``C`` by CV), the others the label-efficiency probe."""
    from matplotlib.figure import Figure

    groups = group_rows(rows, "dataset", "backbone", "objective", "steps", "variant", keep=lambda r: has_fractions(r, fractions))
    if not groups:
        return
    cols = min(4, len(groups))
    nrows = -(-len(groups) // cols)
    fig = Figure(figsize=(3.6 * cols, 3.2 * nrows))
    axes = fig.subplots(nrows, cols, squeeze=False)
    for ax in axes.flat[len(groups):]:
        ax.set_visible(False)
    xs = [*fractions, 1.0]
    for ax, ((data, backbone, objective, steps, extra), rs) in zip(axes.flat, groups.items()):
        for encoder, colour in (("pretrained", "tab:blue"), ("random-init", "tab:grey")):
            per_seed = [[r[f"label_efficiency/{encoder}"][str(f)]["auroc"][0] for f in fractions]
                        + [r[f"linear_probe/{encoder}"]["auroc"]] for r in rs]
            mean = [statistics.mean(v) for v in zip(*per_seed)]
            std = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in zip(*per_seed)]
            ax.errorbar(xs, mean, yerr=std, marker="o", capsize=3, color=colour, label=f"{encoder} ({len(rs)} seeds)")
        pixel = next((p for p in pixels if p["dataset"] == data and "label_efficiency" in p), None)
        if pixel is not None:
            curve = [pixel["label_efficiency"][str(f)]["auroc"] for f in fractions]
            ax.errorbar(xs, [c[0] for c in curve] + [pixel["auroc"]], yerr=[c[1] for c in curve] + [0.0],
                        marker="s", capsize=3, color="tab:orange", linestyle="--", label="raw pixels")
        ax.set_xscale("log")
        ax.set_xticks(xs, [f"{100 * x:g} %" for x in xs])
        ax.set_title(f"{data}: {backbone}-tiny {objective}, {steps} steps" + (f"\n{extra}" if extra else ""), fontsize=8)
        ax.set_xlabel("training labels")
        ax.set_ylabel("test AUROC (linear probe)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, path)


BEGIN, END = "<!-- in-domain:begin -->", "<!-- in-domain:end -->"
LE_BEGIN, LE_END = "<!-- label-efficiency:begin -->", "<!-- label-efficiency:end -->"


def collect(folders: list[Path], fractions: list[float]) -> tuple[list[dict], list[dict]]:
    """The benchmark rows (``<folder>/<run>/row.json``) that hold every fraction's probes, and the raw-pixel
    probes (``<folder>/pixels-*-cv.json``) with a label-efficiency curve, from ``bench_representation --out``
    folders (one per budget or backbone)."""
    import json

    rows = [json.loads(f.read_text()) for folder in folders for f in sorted(folder.glob("*/row.json"))]
    pixels = {}
    for folder in folders:
        for f in sorted(folder.glob("pixels-*-cv.json")):
            row = json.loads(f.read_text())
            if all(str(x) in row.get("label_efficiency", {}) for x in fractions):
                pixels[row["dataset"]] = row
    return [r for r in rows if has_fractions(r, fractions)], list(pixels.values())


def main(argv: list[str] | None = None) -> int:
    """``python scripts/bench_tables.py OUT [OUT ...] --doc docs/results.md``: one label-efficiency table and
    plot over several ``bench_representation.py --label-fractions`` output folders."""
    import argparse

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("folders", nargs="+", type=Path, help="bench_representation.py --out folders")
    parser.add_argument("--fractions", nargs="+", type=float, default=[0.01, 0.1])
    parser.add_argument("--doc", type=Path, required=True, help="markdown file to update between the label-efficiency markers")
    args = parser.parse_args(argv)
    rows, pixels = collect(args.folders, args.fractions)
    if not rows:
        print("no run holds the label-efficiency probes of these fractions", file=sys.stderr)
        return 1
    plot = args.doc.parent / "benchmarks" / "label_efficiency.png"
    plot_label_efficiency(rows, args.fractions, pixels, plot)
    folders = " ".join(str(f) for f in args.folders)
    body = (f"{label_efficiency_table(rows, args.fractions, pixels)}\n\n"
            f"![label efficiency]({plot.relative_to(args.doc.parent).as_posix()})\n\n"
            f"Command: `python scripts/bench_tables.py {folders} --doc {args.doc}` over the `--out` folders of the "
            "`bench_representation.py ... --label-fractions 0.01 0.1` runs")
    write_doc(args.doc, body, LE_BEGIN, LE_END)
    print(body)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
