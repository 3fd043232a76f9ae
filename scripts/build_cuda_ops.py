"""Build mamba-ssm's selective-scan and causal-conv1d's CUDA ops from their source distributions, offline.

For a GPU machine with PyTorch and nvcc but no internet (``scripts/gpu_check.sh`` calls this)::

    python scripts/build_cuda_ops.py --src DIR --out /tmp/ssl_med_cuda_ops
    PYTHONPATH=/tmp/ssl_med_cuda_ops python scripts/gpu_check.py

``DIR`` holds the sdists fetched beforehand on a machine with internet
(``pip download --no-deps --no-binary :all: --no-build-isolation mamba-ssm causal-conv1d``), as
``.tar.gz`` files or unpacked folders. Each extension is compiled with ``torch.utils.cpp_extension.load``
(ninja, all cores) for the local GPU's architecture only, with the compiler flags of the packages' own
``setup.py``; the two builds run in parallel. A full ``pip install`` compiles for eight architectures
and takes tens of minutes; one architecture takes a few.

Only the ops are installed: ``mamba_ssm/__init__.py`` is replaced by an empty one, because the
package's top level imports its Mamba-2/Mamba-3 modules and their extra dependencies, which ssl_med
does not use (it imports ``mamba_ssm.ops.selective_scan_interface`` alone).
A build that fails is reported and skipped; ssl_med then uses its torch scan on the GPU.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import sys
import tarfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

NVCC_FLAGS = [  # both packages' setup.py, minus the -gencode list (set below for the local GPU)
    "-O3", "-std=c++17", "--expt-relaxed-constexpr", "--expt-extended-lambda", "--use_fast_math",
    "-U__CUDA_NO_HALF_OPERATORS__", "-U__CUDA_NO_HALF_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT16_OPERATORS__", "-U__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-U__CUDA_NO_BFLOAT162_OPERATORS__", "-U__CUDA_NO_BFLOAT162_CONVERSIONS__", "--threads", "4",
]


@dataclass(frozen=True)
class OpPackage:
    """One sdist: its Python package, the extension it builds and that extension's sources."""

    dist: str  # sdist name prefix, e.g. "mamba_ssm-"
    package: str
    extension: str
    csrc: str  # folder of the sources, relative to the sdist root
    sources: tuple[str, ...]
    empty_init: bool = False


PACKAGES = (
    OpPackage(
        "mamba_ssm-", "mamba_ssm", "selective_scan_cuda", "csrc/selective_scan",
        ("selective_scan.cpp", "selective_scan_fwd_fp32.cu", "selective_scan_fwd_fp16.cu",
         "selective_scan_fwd_bf16.cu", "selective_scan_bwd_fp32_real.cu", "selective_scan_bwd_fp32_complex.cu",
         "selective_scan_bwd_fp16_real.cu", "selective_scan_bwd_fp16_complex.cu",
         "selective_scan_bwd_bf16_real.cu", "selective_scan_bwd_bf16_complex.cu"),
        empty_init=True,
    ),
    OpPackage(
        "causal_conv1d-", "causal_conv1d", "causal_conv1d_cuda", "csrc",
        ("causal_conv1d.cpp", "causal_conv1d_fwd.cu", "causal_conv1d_bwd.cu", "causal_conv1d_update.cu"),
    ),
)


def _unpacked(src: Path, dist: str, work: Path) -> Path | None:
    """The sdist's root folder for ``dist`` under ``src`` (unpacking a ``.tar.gz`` into ``work``)."""
    folders = sorted(p for p in src.glob(f"{dist}*") if p.is_dir())
    if folders:
        return folders[-1]
    archives = sorted(src.glob(f"{dist}*.tar.gz"))
    if not archives:
        return None
    with tarfile.open(archives[-1]) as tar:
        tar.extractall(work, filter="data")
    return work / archives[-1].name.removesuffix(".tar.gz")


def build(op: OpPackage, root: Path, out: Path, arch: str) -> str:
    """Copy ``op``'s Python package into ``out`` and compile its extension there; returns a report line."""
    from torch.utils.cpp_extension import load

    t0 = time.perf_counter()
    shutil.copytree(root / op.package, out / op.package, dirs_exist_ok=True)
    if op.empty_init:
        (out / op.package / "__init__.py").write_text(f'"""{op.package} ops only (built by ssl_med)."""\n')
    csrc = root / op.csrc
    build_dir = out / f"build_{op.extension}"
    build_dir.mkdir(parents=True, exist_ok=True)
    load(
        name=op.extension,
        sources=[str(csrc / s) for s in op.sources],
        extra_cflags=["-O3", "-std=c++17"],
        extra_cuda_cflags=[*NVCC_FLAGS, "-gencode", f"arch=compute_{arch},code=sm_{arch}"],
        extra_include_paths=[str(csrc)],
        build_directory=str(build_dir),
        verbose=False,
    )
    shutil.copy2(build_dir / f"{op.extension}.so", out / f"{op.extension}.so")
    return f"built {op.extension} ({root.name}) for sm_{arch} in {time.perf_counter() - t0:.0f} s"


def _build_or_report(args: tuple[OpPackage, Path, Path, str]) -> str:
    try:
        return build(*args)
    except Exception as err:  # a failed build leaves the torch path; say why
        return f"FAILED {args[0].extension}: {type(err).__name__}: {str(err)[-2000:]}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, required=True, help="folder with the mamba-ssm / causal-conv1d sdists")
    parser.add_argument("--out", type=Path, required=True, help="folder to put on PYTHONPATH afterwards")
    parser.add_argument("--arch", help="compute capability without the dot, e.g. 90 (default: the local GPU's)")
    args = parser.parse_args()

    import torch

    if args.arch is None:
        if not torch.cuda.is_available():
            print("no CUDA device and no --arch: nothing to build")
            return 0
        major, minor = torch.cuda.get_device_capability()
        args.arch = f"{major}{minor}"
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 4))
    os.environ["TORCH_CUDA_ARCH_LIST"] = f"{args.arch[:-1]}.{args.arch[-1]}"
    args.out.mkdir(parents=True, exist_ok=True)
    work = args.out / "src"
    jobs = []
    for op in PACKAGES:
        root = _unpacked(args.src, op.dist, work)
        if root is None:
            print(f"skipped {op.extension}: no {op.dist}* sdist in {args.src}")
        else:
            jobs.append((op, root, args.out, args.arch))
    spawn = multiprocessing.get_context("spawn")  # this process may have initialised CUDA
    with ProcessPoolExecutor(max_workers=max(1, len(jobs)), mp_context=spawn) as pool:
        for line in pool.map(_build_or_report, jobs):
            print(line, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
