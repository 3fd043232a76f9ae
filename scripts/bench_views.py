"""Per-sample view throughput of every objective, one CPU thread, next to lightly's ``DINOTransform``.

Usage::

    python scripts/bench_views.py [--shared ../shared/data] [--out docs/benchmarks/views.md] [--quick]
                                  [--lightly-venv /tmp/lightly-venv]

Each row times one objective's view transform as the crop dataset calls it: per sample,
``set_random_state(seed)`` then the transform, with ``torch.set_num_threads(1)``; the time is the best
of 3 repeats (the machines are shared). "views" counts the tensors the encoder sees per sample (DINO:
2 global + n local crops; MAE / Hi-End-MAE: 1; graph matching: 2; VoCo: bases + random crops).

Inputs (real images): BreastMNIST 28^2 train images and an axial slice / a central 96^3 crop of the
BraTS 2020 FLAIR case from ``--shared``; without them, the MNI152 T1 template that nilearn ships
(slices resized to 28^2 for the small rows). lightly runs in its own virtual environment
(``--system-site-packages``, ``pip install lightly``), created on first use, in a subprocess of this
script, which times ssl_med's DINO views again there with their repeats interleaved with lightly's
(the ratio column uses those pairs, so both sides see the same machine load); when lightly cannot
be installed its rows say so and only ssl_med is measured. lightly gets the same image as an 8-bit
greyscale PIL image, the same crop sizes, scales and number of local views, no normalisation, its
other options at their defaults.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
REPEATS = 3
# (name, input, global size, local size, n_local): the two 2D settings
DINO_2D = [("28", 28, 12, 4), ("mri", 64, 32, 6)]


def best_time(fn: Callable[[], None], n: int, repeats: int = REPEATS) -> float:
    """Seconds per call of ``fn``, best of ``repeats`` runs of ``n`` calls (after one warm-up call)."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(n):
            fn()
        best = min(best, (time.perf_counter() - t) / n)
    return best


# -- inputs ----------------------------------------------------------------------------------------
def load_images(shared: Path) -> tuple[dict[str, np.ndarray], str]:
    """uint8 images: ``small`` ``(64, 28, 28)``, ``slice`` ``(240, 240)``-ish, ``volume`` ``(96, 96, 96)``."""
    breast = shared / "medmnist" / "breastmnist.npz"
    flair = shared / "brats2020_sample/BraTS20_Training_001/BraTS20_Training_001_flair.nii.gz"
    if breast.exists() and flair.exists():
        import nibabel as nib

        vol = np.asarray(nib.load(str(flair)).dataobj, dtype=np.float32)  # (240, 240, 155)
        vol = np.clip(vol / np.percentile(vol[vol > 0], 99.5), 0, 1)
        vol8 = (vol * 255).round().astype(np.uint8)
        small = np.load(breast)["train_images"][:64]
        source = "BreastMNIST train images 0-63 (28^2); BraTS 2020 case 001 FLAIR, axial slice 77 (240^2) and centre 96^3 crop"
        return {"small": small, "slice": vol8[:, :, 77].T, "volume": vol8[72:168, 72:168, 29:125]}, source
    import torch
    import torch.nn.functional as F

    from ssl_med.data.sources.demo import mni152

    vol8 = mni152("T1")[0][0]  # (Z, Y, X) uint8
    z = vol8.shape[0] // 2
    slices = torch.from_numpy(vol8[z - 32 : z + 32].astype(np.float32))[:, None]
    small = F.interpolate(slices, size=(28, 28), mode="area")[:, 0].round().byte().numpy()
    c = [s // 2 for s in vol8.shape]
    volume = vol8[c[0] - 48 : c[0] + 48, c[1] - 48 : c[1] + 48, c[2] - 48 : c[2] + 48]
    source = "MNI152 T1 template (nilearn; --shared data absent): slices resized to 28^2, mid slice, centre 96^3 crop"
    return {"small": small, "slice": vol8[z], "volume": volume}, source


# -- ssl_med ---------------------------------------------------------------------------------------
def ssl_med_rows(images: dict[str, np.ndarray], quick: bool) -> list[dict]:
    import torch

    from objectives.graph_matching import TwoViews
    from objectives.hi_end_mae import HiEndMAEViews
    from objectives.mae import MAEViews
    from objectives.views import MultiCropViews
    from objectives.voco import VoCoViews

    torch.set_num_threads(1)

    def tensor(a: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(a.astype(np.float32) / 255)[None]

    small = [tensor(a) for a in images["small"]]
    mri = [tensor(images["slice"])]
    volume = [tensor(images["volume"])]
    cases: list[tuple[str, str, str, Callable, list[torch.Tensor], int, int]] = []
    for name, glob, loc, n_local in DINO_2D:
        views = MultiCropViews(2, (4, 4), n_local, global_crop_size=(glob,) * 2, local_crop_size=(loc,) * 2)
        data = small if name == "28" else mri
        cases.append(("DINO", "2D", f"{data[0].shape[-1]}² → 2×{glob}² + {n_local}×{loc}²", views, data, 2 + n_local, 300))
    dino3d = MultiCropViews(3, (16,) * 3, 4)
    cases.append(("DINO", "3D", "96³ → 2×96³ + 4×48³", dino3d, volume, 6, 4))
    for dims, data, size, n in (("2D", small, "28²", 2000), ("2D", mri, "240²", 2000), ("3D", volume, "96³", 100)):
        nd = int(dims[0])
        cases.append(("MAE", dims, size, MAEViews(nd, (4,) * nd), data, 1, n))
        cases.append(("Hi-End-MAE", dims, size, HiEndMAEViews(nd), data, 1, n))
    for dims, data, size, n in (("2D", small, "28² → 2×28²", 500), ("2D", mri, "240² → 2×240²", 100),
                                ("3D", volume, "96³ → 2×96³", 3)):  # fmt: skip
        cases.append(("graph matching", dims, size, TwoViews(), data, 2, n))
    voco2d = [tensor(images["slice"][:96, :96].copy())] if images["slice"].shape[0] >= 96 else mri
    cases.append(("VoCo", "2D", "96² region → 9 bases + 2 crops of 32²", VoCoViews(), voco2d, 11, 1000))
    cases.append(("VoCo", "3D", "96³ region → 9 bases + 2 crops of 96×32²", VoCoViews(), volume, 11, 100))
    rows = []
    for objective, dims, setting, views, data, n_views, n in cases:
        n = max(1, n // 10) if quick else n
        state = {"i": 0}

        def call(views=views, data=data, state=state) -> None:
            i = state["i"] = state["i"] + 1
            views.set_random_state(seed=i)
            views({"image": data[i % len(data)]})

        sec = best_time(call, n)
        rows.append(dict(objective=objective, dims=dims, setting=setting, views=n_views, sec=sec))
        print(f"{objective:15s} {dims} {setting:40s} {sec * 1e3:8.3f} ms/sample {n_views / sec:10.0f} views/s", flush=True)
    return rows


# -- lightly ---------------------------------------------------------------------------------------
def lightly_worker(images_path: str, quick: bool) -> None:
    """Runs inside the lightly venv (which also sees ssl_med): prints one JSON line with, per DINO 2D
    setting, lightly's and ssl_med's seconds per sample, their repeats interleaved (same load)."""
    import torch
    from lightly.transforms import DINOTransform
    from PIL import Image

    from objectives.views import MultiCropViews

    torch.set_num_threads(1)
    data = np.load(images_path)
    out = []
    for name, glob, loc, n_local in DINO_2D:
        arrays = data["small"] if name == "28" else data["slice"][None]
        pils = [Image.fromarray(a) for a in arrays]
        tensors = [torch.from_numpy(a.astype(np.float32) / 255)[None] for a in arrays]
        light = DINOTransform(
            global_crop_size=glob, local_crop_size=loc, n_local_views=n_local,
            global_crop_scale=(0.32, 1.0), local_crop_scale=(0.05, 0.32), normalize=None,
        )  # fmt: skip
        ours = MultiCropViews(2, (4, 4), n_local, global_crop_size=(glob,) * 2, local_crop_size=(loc,) * 2)
        state = {"i": 0}

        def call_light(state=state, light=light, pils=pils) -> None:
            state["i"] += 1
            light(pils[state["i"] % len(pils)])

        def call_ours(state=state, ours=ours, tensors=tensors) -> None:
            state["i"] += 1
            ours.set_random_state(seed=state["i"])
            ours({"image": tensors[state["i"] % len(tensors)]})

        n = 30 if quick else 300
        best = {"lightly": float("inf"), "ours": float("inf")}
        for _ in range(REPEATS):
            best["lightly"] = min(best["lightly"], best_time(call_light, n, repeats=1))
            best["ours"] = min(best["ours"], best_time(call_ours, n, repeats=1))
        out.append(dict(setting=name, sec=best["lightly"], ours_sec=best["ours"], views=2 + n_local))
    import lightly

    print(json.dumps({"version": lightly.__version__, "rows": out}))


def lightly_rows(images: dict[str, np.ndarray], venv: Path, quick: bool) -> tuple[list[dict], str]:
    python = venv / "bin" / "python"
    try:
        if not python.exists():
            subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True)
        if subprocess.run([str(python), "-c", "import lightly"], capture_output=True).returncode:
            subprocess.run([str(python), "-m", "pip", "install", "-q", "lightly"], check=True)
    except (subprocess.CalledProcessError, OSError) as err:
        return [], f"lightly could not be installed ({err}); only ssl_med is measured"
    path = Path("/tmp/bench_views_images.npz")
    np.savez(path, small=images["small"], slice=images["slice"])
    args = [str(python), __file__, "--lightly-worker", str(path)] + (["--quick"] if quick else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(args, capture_output=True, text=True, env=env)
    if res.returncode:
        return [], f"lightly's run failed: {res.stderr.strip().splitlines()[-1:]}"
    result = json.loads(res.stdout.strip().splitlines()[-1])
    return result["rows"], f"lightly {result['version']}"


# -- table -----------------------------------------------------------------------------------------
NOTES = [
    "## Notes",
    "",
    "- **What each side does per crop.** ssl_med (`objectives/views.py`): integer crop box, bilinear "
    "(trilinear) resize, flips, brightness and contrast (p 0.8 each), Gaussian blur (global 1 always, "
    "global 2 p 0.1, locals p 0.5; sigma scaled by crop size / 224), solarisation (global 2, p 0.2), clamp "
    "to [0, 1]; all parameters of a sample are drawn in one numpy call and the pixel work is plain torch "
    "ops, vectorised over the crops of one size. lightly's `DINOTransform` (PIL + torchvision): "
    "`RandomResizedCrop` with an aspect-ratio draw, flip, colour jitter (brightness, contrast, saturation, "
    "hue in random order, p 0.8), random grayscale (p 0.2), PIL Gaussian blur, solarisation, `ToTensor`. "
    "Saturation, hue and grayscale change nothing on a grey image but still cost lightly time; it has no "
    "3D path.",
    "- **Before the rewrite** the DINO views were per-sample MONAI pipelines (`RandScaleCropd`, `Resized`, "
    "`RandFlipd`, `RandScaleIntensityd`, ... reseeded per call): about 15 ms per 28² sample, 0.95–1.5 s "
    "per batch of 64 on these machines (measured before the change, not in this run), most of it "
    "per-call overhead rather than pixel work.",
    "- **3D** has no lightly counterpart; the DINO 3D row is dominated by pixel work (two trilinear "
    "resizes to 96³ and a 3D blur of global crop 1), as are the 3D rows of the other objectives.",
    "- Graph matching's and VoCo's views were plain torch already and are measured as they are.",
]


def write_table(rows: list[dict], light: list[dict], note: str, source: str, out: Path, cmd: str) -> None:
    light_by = {r["setting"]: r for r in light}
    lines = [
        "# View throughput per objective (one CPU thread)",
        "",
        f"`{cmd}` on {datetime.date.today().isoformat()}; {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores shared with other work (best of {REPEATS} repeats), torch "
        f"{__import__('torch').__version__}, `torch.set_num_threads(1)`; {note}.",
        "",
        f"Input: {source}. Each sample: `set_random_state(seed)` then the objective's view transform, as the "
        "crop dataset calls it. Views/s counts the tensors the encoder sees (DINO: 2 global + n local crops).",
        "",
        "| objective | dims | setting | views/sample | ms/sample | views/s per core | lightly `DINOTransform` views/s | ssl_med ÷ lightly |",
        "|---|---|---|---|---|---|---|---|",
    ]
    dino_keys = iter(name for name, *_ in DINO_2D)
    for r in rows:
        vps = r["views"] / r["sec"]
        lcell, ratio = "", ""
        if r["objective"] == "DINO" and r["dims"] == "2D":
            lr = light_by.get(next(dino_keys))
            if lr:
                lvps = lr["views"] / lr["sec"]
                paired = lr["views"] / lr["ours_sec"]  # ssl_med timed interleaved with lightly
                lcell, ratio = f"{lvps:,.0f}", f"{paired / lvps:.1f}× ({paired:,.0f} views/s interleaved)"
            else:
                lcell = "not measured"
        lines.append(
            f"| {r['objective']} | {r['dims']} | {r['setting']} | {r['views']} | {r['sec'] * 1e3:.3f} | {vps:,.0f} | {lcell} | {ratio} |"
        )
    dino28 = next(r for r in rows if r["objective"] == "DINO" and r["setting"].startswith("28²"))
    lines += ["", f"DINO views for a batch of 64 BreastMNIST-sized samples (28², 2 global + 4 local crops): "
              f"{64 * dino28['sec']:.3f} s per core.", "", *NOTES]  # fmt: skip
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    ap.add_argument("--out", type=Path, default=None, help="markdown table (default: print only)")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--lightly-venv", type=Path, default=Path("/tmp/lightly-venv"))
    ap.add_argument("--no-lightly", action="store_true")
    ap.add_argument("--lightly-worker", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.lightly_worker:
        lightly_worker(a.lightly_worker, a.quick)
        return
    images, source = load_images(a.shared)
    rows = ssl_med_rows(images, a.quick)
    light, note = ([], "lightly not run (--no-lightly)") if a.no_lightly else lightly_rows(images, a.lightly_venv, a.quick)
    for r in light:
        print(f"lightly DINOTransform {r['setting']:6s} {r['sec'] * 1e3:8.3f} ms/sample {r['views'] / r['sec']:10.0f} views/s"
              f" (ssl_med interleaved: {r['views'] / r['ours_sec']:10.0f} views/s)")
    cmd = "python scripts/bench_views.py" + (" --quick" if a.quick else "") + (f" --out {a.out}" if a.out else "")
    if a.out:
        write_table(rows, light, note, source, a.out, cmd)


if __name__ == "__main__":
    main()
