"""Random 96³ crop throughput: ssl_med's Zarr store vs MONAI's usual pipelines vs in-memory cropping.

Usage::

    python scripts/bench_data.py [--shared ../shared/data] [--out docs/benchmarks/data_results.md] [--quick]

Volumes: the real BraTS 2020 FLAIR volume at its native 240×240×155 and the same volume resampled to
CT size 512×512×300 (trilinear; its tumour label nearest). Every DataLoader pipeline runs in its own
subprocess with 2 workers (spawn) so that its peak RSS (main + workers) is its own; throughput is
timed after the first batch (worker start-up excluded). "cold" rows evict the files' pages from the
page cache first (``posix_fadvise(DONTNEED)``, no root needed); "warm" rows read them once before.
Also prints a single-process sweep over chunk shape, codec and read engine (how the layout was chosen).
Skips with a message when the BraTS case is absent.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from bench_proc import proc_status_mib

CROP = (96, 96, 96)
CASE = "brats2020_sample/BraTS20_Training_001/BraTS20_Training_001"


# -- helpers ----------------------------------------------------------------------------------------


def evict(paths: list[Path]) -> None:
    """Drop the page-cache pages of every file under ``paths`` (cold-cache reads)."""
    for root in paths:
        files = [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.fsync(fd) if os.access(f, os.W_OK) else None
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def warm(paths: list[Path]) -> None:
    for root in paths:
        for f in [root] if root.is_file() else [p for p in root.rglob("*") if p.is_file()]:
            f.read_bytes()


def size_of(path: Path) -> int:
    return (
        path.stat().st_size
        if path.is_file()
        else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    )


def random_regions(shape: tuple[int, ...], n: int, seed: int = 0) -> list[tuple[slice, ...]]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        start = [int(rng.integers(0, s - c + 1)) for s, c in zip(shape, CROP)]
        out.append(tuple(slice(a, a + c) for a, c in zip(start, CROP)))
    return out


# -- datasets used in the worker subprocesses ---------------------------------------------------------


class InMemoryCrops:
    """The ceiling: the same crops and normalisation as the store's default, cut from an array in memory."""

    def __init__(self, array: np.ndarray, window: np.ndarray, length: int) -> None:
        self.array, self.window, self.length = array, window, length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        import torch

        rng = np.random.default_rng([0, index])
        start = [int(rng.integers(0, s - c + 1)) for s, c in zip(self.array.shape[1:], CROP)]
        crop = self.array[(slice(None), *(slice(a, a + c) for a, c in zip(start, CROP)))]
        lo, hi = self.window[0]
        return {"image": torch.from_numpy(np.clip((crop.astype(np.float32) - lo) / (hi - lo), 0, 1))}


class HandOffOnly:
    """No reading at all: a fresh int16 96³ crop per item, to time the worker -> main hand-off alone."""

    def __init__(self, length: int) -> None:
        self.length = length

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int):
        import torch

        return {"image": torch.zeros((1, *CROP), dtype=torch.int16)}


def run_pipeline(spec: dict) -> dict:
    """Time one pipeline in this (sub)process; returns crops/s, crops, seconds, peak RSS."""
    import torch
    from torch.utils.data import DataLoader

    torch.set_num_threads(1)
    from ssl_med.data.intensity import normalise_batch

    kind, n_crops = spec["kind"], spec["crops"]
    per_item = 1
    finish = normalise_batch if kind == "store_int16_main" else (lambda item: item)
    if kind.startswith("store"):
        from ssl_med.data.crops import RandomCropDataset

        ds = RandomCropDataset(
            spec["store"], CROP, num_channels=None, length=n_crops + 8, engine=spec.get("engine", "auto"),
            normalise="worker" if kind == "store" else "batch",
        )  # fmt: skip
        batch = 4
    elif kind == "handoff_int16":
        ds, batch = HandOffOnly(n_crops + 8), 4
    elif kind == "memory":
        from ssl_med.data.intensity import intensity_window
        from ssl_med.data.store import ImageStore

        store = ImageStore(spec["store"])
        name = next(iter(store))
        ds = InMemoryCrops(store.read(name), intensity_window(store.manifest[name]), n_crops + 8)
        batch = 4
    else:
        from monai.data import Dataset
        from monai.transforms import (
            Compose,
            EnsureChannelFirstd,
            LoadImaged,
            RandCropByPosNegLabeld,
            RandSpatialCropd,
        )

        if kind == "monai":
            keys = ["image"]
            crop = RandSpatialCropd(keys, roi_size=CROP, random_size=False)
            items = [{"image": spec["nii"]}] * (n_crops + 2)
        else:
            keys = ["image", "label"]
            per_item = 4
            crop = RandCropByPosNegLabeld(
                keys, "label", spatial_size=CROP, pos=1, neg=1, num_samples=per_item
            )
            items = [{"image": spec["nii"], "label": spec["seg"]}] * (n_crops // per_item + 2)
        ds = Dataset(items, Compose([LoadImaged(keys, image_only=True), EnsureChannelFirstd(keys), crop]))
        batch = 1
    loader = DataLoader(
        ds, batch_size=batch, num_workers=2, multiprocessing_context="spawn", persistent_workers=True
    )
    it = iter(loader)
    next(it)  # workers started and warmed up
    count, t0 = 0, time.perf_counter()
    for item in it:
        finish(item)  # store_int16_main: the main process normalises (counted); store_int16: the GPU would
        count += per_item if kind.startswith("monai") else batch
        if count >= n_crops:
            break
    seconds = time.perf_counter() - t0
    pids = ["self", *(str(w.pid) for w in it._workers)]
    rss = sum(proc_status_mib("VmHWM", pid) for pid in pids)  # main + both workers, each at its peak
    del it, loader
    return {"crops": count, "seconds": seconds, "crops_per_s": count / seconds, "peak_rss_mb": rss}


def pipeline_in_subprocess(spec: dict, cold_paths: list[Path] | None, timeout: float) -> dict:
    if cold_paths is not None:
        evict(cold_paths)
    cmd = [sys.executable, __file__, "--run", json.dumps(spec)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as exc:
        return {
            "error": f"{type(exc).__name__}: {getattr(exc, 'stderr', '')[-400:] if getattr(exc, 'stderr', '') else exc}"
        }
    return json.loads(out.stdout.strip().splitlines()[-1])


# -- volumes and stores -------------------------------------------------------------------------------


def prepare(shared: Path, work: Path) -> dict[str, dict]:
    """The native and CT-sized volumes as .nii.gz + label, and ingested stores."""
    import nibabel as nib
    from scipy import ndimage

    from ssl_med.data.ingest import IngestOptions, ingest

    flair = nib.load(str(shared / f"{CASE}_flair.nii.gz"))
    seg = nib.load(str(shared / f"{CASE}_seg.nii.gz"))
    vols = {}
    for tag, factors in [("native", None), ("ct", (512 / 240, 512 / 240, 300 / 155))]:
        folder = work / tag
        folder.mkdir()
        if factors is None:
            shutil.copy(shared / f"{CASE}_flair.nii.gz", folder / "flair.nii.gz")
            shutil.copy(shared / f"{CASE}_seg.nii.gz", folder / "seg.nii.gz")
        else:
            data = ndimage.zoom(np.asarray(flair.dataobj), factors, order=1).astype(np.int16)
            lab = ndimage.zoom(np.asarray(seg.dataobj), factors, order=0).astype(np.uint8)
            affine = flair.affine @ np.diag([1 / factors[0], 1 / factors[1], 1 / factors[2], 1])
            nib.save(nib.Nifti1Image(data, affine), str(folder / "flair.nii.gz"))
            nib.save(nib.Nifti1Image(lab, affine), str(folder / "seg.nii.gz"))
        store = work / f"{tag}.zarr"
        ingest([str(folder / "flair.nii.gz")], str(store), IngestOptions(orientation=""), progress=False)
        shape = tuple(nib.load(str(folder / "flair.nii.gz")).shape)
        vols[tag] = {
            "nii": folder / "flair.nii.gz",
            "seg": folder / "seg.nii.gz",
            "store": store,
            "shape": shape,
        }
    return vols


def layout_sweep(nii: Path, work: Path, n: int) -> list[dict]:
    """Single-process crops/s for chunk shapes, codecs and engines (one volume)."""
    import nibabel as nib

    from ssl_med.data.layout import Layout
    from ssl_med.data.store import ImageStore

    volume = np.asarray(nib.load(str(nii)).dataobj).transpose(2, 1, 0)[None]
    regions = random_regions(volume.shape[1:], n, seed=1)
    configs = [
        ("64³ zstd-5 bitshuffle", Layout(chunk_3d=64, cname="zstd", clevel=5, shuffle="bitshuffle"), "zarr"),
        (
            "64³ zstd-5 bitshuffle",
            Layout(chunk_3d=64, cname="zstd", clevel=5, shuffle="bitshuffle"),
            "direct",
        ),
        ("64³ zstd-3 shuffle", Layout(chunk_3d=64, cname="zstd", clevel=3, shuffle="shuffle"), "direct"),
        ("64³ lz4-5 shuffle", Layout(chunk_3d=64), "zarr"),
        ("64³ lz4-5 shuffle", Layout(chunk_3d=64), "direct"),
        ("32³ lz4-5 shuffle", Layout(chunk_3d=32), "direct"),
        ("128³ lz4-5 shuffle", Layout(chunk_3d=128), "direct"),
        ("32³ in 128³ shards lz4-5", Layout(chunk_3d=32, shard_3d=128), "zarr"),
    ]
    rows, written = [], {}
    for label, layout, engine in configs:
        path = work / f"sweep_{abs(hash(layout))}.zarr"
        if layout not in written:
            ImageStore(path, mode="a").add("v", volume, (1.0, 1.0, 1.0), layout=layout)
            written[layout] = size_of(path)
        store = ImageStore(path, engine=engine)
        store.read("v", regions[0])
        t0 = time.perf_counter()
        for r in regions:
            store.read("v", r)
        dt = time.perf_counter() - t0
        rows.append(
            {"layout": label, "engine": engine, "crops_per_s": n / dt, "disk_mb": written[layout] / 2**20}
        )
    t0 = time.perf_counter()
    for r in regions:
        np.ascontiguousarray(volume[(slice(None), *r)])
    rows.append(
        {
            "layout": "in-memory numpy",
            "engine": "-",
            "crops_per_s": n / (time.perf_counter() - t0),
            "disk_mb": 0.0,
        }
    )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--shared", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data")
    )
    parser.add_argument("--out", default=None, help="write the markdown tables here too")
    parser.add_argument("--quick", action="store_true", help="fewer crops (smoke run)")
    parser.add_argument("--run", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        print(json.dumps(run_pipeline(json.loads(args.run))))
        return 0
    shared = Path(args.shared)
    if not (shared / f"{CASE}_flair.nii.gz").exists():
        print(f"BraTS case not found under {shared}: benchmark skipped")
        return 0
    q = 0.25 if args.quick else 1.0
    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bench_data_") as tmp:
        work = Path(tmp)
        t0 = time.perf_counter()
        vols = prepare(shared, work)
        print(f"prepared volumes in {time.perf_counter() - t0:.0f} s", flush=True)
        sweep = layout_sweep(vols["native"]["nii"], work, int(60 * q) or 8)
        lines += ["### Layout sweep (BraTS FLAIR 240×240×155, int16, one process, warm cache)", "",
                  "| chunks / codec | engine | 96³ crops/s | on disk (MiB) |", "|---|---|---|---|"]  # fmt: skip
        lines += [
            f"| {r['layout']} | {r['engine']} | {r['crops_per_s']:.0f} | {r['disk_mb']:.1f} |" for r in sweep
        ]
        print("\n".join(lines), flush=True)
        plan = {  # crops per pipeline (MONAI is slow: fewer crops)
            "native": {"store": 400, "store_int16": 480, "store_int16_main": 400, "memory": 400,
                       "handoff_int16": 640, "monai": 32, "monai_posneg": 32},
            "ct": {"store": 320, "store_int16": 320, "store_int16_main": 320, "memory": 320, "monai": 6,
                   "monai_posneg": 8},
        }
        results: dict[tuple[str, str, str], dict] = {}
        for tag, vol in vols.items():
            for cache in ("warm", "cold"):
                for kind, n in plan[tag].items():
                    if cache == "cold" and kind in ("memory", "store_int16_main", "handoff_int16"):
                        continue
                    spec = {"kind": kind, "crops": max(4, int(n * q)), "store": str(vol["store"]),
                            "nii": str(vol["nii"]), "seg": str(vol["seg"])}  # fmt: skip
                    files = [vol["store"]] if kind.startswith(("store", "memory")) else [vol["nii"], vol["seg"]]
                    if cache == "warm":
                        warm(files)
                    res = pipeline_in_subprocess(spec, files if cache == "cold" else None, timeout=240)
                    results[(tag, cache, kind)] = res
                    print(tag, cache, kind, res, flush=True)
        names = {"store": "ssl_med store (Zarr, 1 crop/read), float32 hand-off",
                 "store_int16": "ssl_med store, int16 hand-off (normalised on the GPU: not counted)",
                 "store_int16_main": "ssl_med store, int16 hand-off, normalised in the main process",
                 "memory": "in-memory array, float32 hand-off (ceiling of the store row)",
                 "handoff_int16": "hand-off alone: empty int16 crops, no reading (ceiling of the int16 rows)",
                 "monai": "MONAI LoadImaged .nii.gz + RandSpatialCropd (1 crop/load)",
                 "monai_posneg": "MONAI LoadImaged .nii.gz + RandCropByPosNegLabeld (4 crops/load)"}  # fmt: skip
        table = ["", "### 96³ crops, 2 DataLoader workers (spawn), 1 channel int16", "",
                 "| volume | cache | pipeline | crops/s | MB/s | store ÷ this | this ÷ MONAI 1 crop/load "
                 "| peak RSS, main + 2 workers (MiB) |",
                 "|---|---|---|---|---|---|---|---|"]  # fmt: skip
        mb_per_crop = np.prod(CROP) * 2 / 1e6
        for (tag, cache, kind), res in results.items():
            shape = "×".join(str(s) for s in vols[tag]["shape"])
            if "error" in res:
                table.append(f"| {shape} | {cache} | {names[kind]} | error: {res['error'][:80]} | | | | |")
                continue
            ref = results.get((tag, cache, "store"), {}).get("crops_per_s")
            monai = results.get((tag, cache, "monai"), {}).get("crops_per_s")
            ratio = f"{ref / res['crops_per_s']:.1f}×" if ref else "-"
            vs_monai = f"**{res['crops_per_s'] / monai:.1f}×**" if monai and not kind.startswith("monai") else "-"
            table.append(f"| {shape} | {cache} | {names[kind]} | {res['crops_per_s']:.3g} | "
                         f"{res['crops_per_s'] * mb_per_crop:.0f} | {ratio} | {vs_monai} | {res['peak_rss_mb']:.0f} |")  # fmt: skip
        table += [
            "",
            "### On-disk size",
            "",
            "| volume | .nii.gz (MiB) | store (MiB) | store ÷ .nii.gz |",
            "|---|---|---|---|",
        ]
        for vol in vols.values():
            nii, st = size_of(vol["nii"]) / 2**20, size_of(vol["store"]) / 2**20
            table.append(f"| {'×'.join(map(str, vol['shape']))} | {nii:.1f} | {st:.1f} | {st / nii:.2f} |")
        print("\n".join(table), flush=True)
        lines += table
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
