"""Linear-probe fitting time with several evaluations at once: BLAS threads per process as is vs ``num_threads=1``.

Usage::

    python scripts/bench_probe_threads.py [--shared ../shared/data] [--procs 1 2] [--out docs/benchmarks/probe_threads.md]

The linear probe's read-out and ``C`` choice (``eval.select_on=cv``: 5 folds x 9 ``C`` x the read-outs, L-BFGS
logistic regression, ``ssl_med.evaluators.readout.cv_scores``) spends its time in numpy / scipy BLAS calls on
small matrices. Each process of a row runs that choice on the same features at the same time as the row's
other processes; a row is either the libraries' default thread pools (one thread per core in every BLAS and
OpenMP library each process loads) or ``num_threads=1`` applied the way ``ssl_med evaluate num_threads=1``
applies it (``ssl_med.commands.apply_num_threads``, before scipy and scikit-learn load). The number is the
mean wall time of the processes of a row; the ratio compares it with the default-pool row of the same number
of processes, measured in the same run.

Features: the VesselMNIST3D train + val volumes of ``--shared`` (1,526 volumes of 28^3), each mapped by a
fixed random projection to 192 values and a tanh (a random network's read-out, the shape of a ViT-tiny
``pooled`` feature), twice with different projections for a 384-value ``pooled+mean_patch``-like read-out;
without the shared data, Gaussian volumes with a planted linear label.
"""

from __future__ import annotations

import argparse
import datetime
import multiprocessing as mp
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
C_GRID = [1e-4, 1e-3, 1e-2, 1e-1, 1.0, 1e1, 1e2, 1e3, 1e4]


def volumes_file(shared: Path) -> Path:
    return shared / "medmnist" / "vesselmnist3d.npz"


def features(shared: Path) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """``({read-out: (N, D)}, labels (N,))``; fixed seeds, so every process gets the same arrays."""
    rng = np.random.default_rng(0)
    if volumes_file(shared).is_file():
        data = np.load(volumes_file(shared))
        volumes = np.concatenate([data["train_images"], data["val_images"]]).reshape(-1, 28**3) / 255.0
        labels = np.concatenate([data["train_labels"], data["val_labels"]]).ravel().astype(int)
    else:
        volumes = rng.standard_normal((1526, 28**3)).astype(np.float32)
        labels = (volumes[:, :64].sum(1) > 0).astype(int)
    projections = [rng.standard_normal((volumes.shape[1], 192)).astype(np.float32) / 28**1.5 for _ in range(2)]
    first, second = (np.tanh(volumes @ p) for p in projections)
    return {"pooled": first, "mean_patch": second, "pooled+mean_patch": np.concatenate([first, second], 1)}, labels


def worker(shared: str, one_thread: bool, ready: mp.Barrier, result: mp.Queue) -> None:
    """Load, wait until every process of the row has, choose (read-out, C) by 5-fold CV, report the seconds."""
    if one_thread:  # as `ssl_med evaluate num_threads=1` does, before scipy / scikit-learn are imported
        from omegaconf import OmegaConf

        from ssl_med.commands import apply_num_threads

        apply_num_threads(OmegaConf.create({"num_threads": 1}))
    import warnings

    from ssl_med.evaluators.linear_probe import fit_logistic
    from ssl_med.evaluators.readout import cv_scores

    feats, labels = features(Path(shared))
    ready.wait()
    began = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the probe tallies non-converged fits; here only the time counts
        for x in feats.values():
            cv_scores(x, labels, "binary-class", C_GRID, "auroc", 5, 0, lambda a, b, c: fit_logistic(a, b, c, "binary-class"))
    result.put(time.perf_counter() - began)


def row(shared: Path, procs: int, one_thread: bool) -> float:
    """Mean seconds per process with ``procs`` processes fitting at once."""
    ctx = mp.get_context("spawn")  # fresh interpreters: each loads its BLAS libraries after its own limits
    ready, result = ctx.Barrier(procs), ctx.Queue()
    workers = [ctx.Process(target=worker, args=(str(shared), one_thread, ready, result)) for _ in range(procs)]
    for w in workers:
        w.start()
    seconds = [result.get(timeout=3600) for _ in workers]
    for w in workers:
        w.join()
    return float(np.mean(seconds))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shared", type=Path, default=ROOT.parent / "shared" / "data")
    parser.add_argument("--procs", type=int, nargs="+", default=[1, 2], help="evaluations at once, one row each")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "probe_threads.md")
    parser.add_argument("--note", default="", help="what else the machine was doing, for the table's header")
    args = parser.parse_args(argv)
    source = (
        "the VesselMNIST3D train + val volumes (1,526 of 28^3) under fixed random projections"
        if volumes_file(args.shared).is_file() else "Gaussian volumes with a planted label (shared data not found)"
    )
    lines = [
        "| evaluations at once | BLAS / OpenMP threads per process | CV choice, s per evaluation | vs the default pools |",
        "|---|---|---|---|",
    ]
    for procs in args.procs:
        default = row(args.shared, procs, one_thread=False)
        single = row(args.shared, procs, one_thread=True)
        print(f"{procs} process(es): default pools {default:.1f} s, num_threads=1 {single:.1f} s", flush=True)
        lines.append(f"| {procs} | library default (one per core) | {default:.1f} | 1.00 |")
        lines.append(f"| {procs} | 1 (`num_threads=1`) | {single:.1f} | {single / default:.2f} |")
    args.out.write_text(
        "# Linear-probe fits with several evaluations at once\n\n"
        f"Written by `scripts/bench_probe_threads.py` on {datetime.date.today()} ({platform.machine()}, "
        f"{os.cpu_count()} cores; the machine is shared, so times are upper bounds{'; ' + args.note if args.note else ''}). "
        "Each evaluation chooses the "
        f"read-out and `C` of the linear probe by 5-fold CV ({len(C_GRID)} `C` x 3 read-outs x 5 folds = 135 "
        f"L-BFGS fits) on {source}.\n\n" + "\n".join(lines) + "\n"
    )
    print(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
