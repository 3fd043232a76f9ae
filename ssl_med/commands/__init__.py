"""``ssl_med <command>`` implementations: one module per command, each defining ``COMMAND``.

A module ``ssl_med/commands/<name>.py`` with ``COMMAND = Command(help=..., run=...)`` becomes
``ssl_med <name>``; ``run`` receives the remaining arguments and returns the exit code. Commands that
take Hydra overrides call :func:`run_hydra` with their config name in ``conf/``.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

CONFIG_PACKAGE = "pkg://ssl_med.conf"
#: the environment variables a BLAS / OpenMP library reads for its thread count when it is loaded
THREAD_ENV = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")


@dataclass(frozen=True)
class Command:
    help: str
    run: Callable[[list[str]], int]


def apply_num_threads(cfg: Any) -> None:
    """``num_threads=N`` of a command's config: torch's intra-op threads and the BLAS / OpenMP pools of
    numpy, scipy and scikit-learn (``threadpoolctl``) in this process (``null``: the libraries' defaults,
    one per core). On a CPU shared with other jobs 1 is fastest: the probes' L-BFGS fits call BLAS on
    small matrices, and with a BLAS thread per core in every process two probes at once on 2 cores
    took 9× as long as with one (docs/benchmarks/probe_threads.md)."""
    if cfg.get("num_threads"):
        import torch
        from threadpoolctl import threadpool_limits

        threads = int(cfg.num_threads)
        torch.set_num_threads(threads)
        for name in THREAD_ENV:  # the pools of libraries loaded from now on (scipy's own OpenBLAS, ...)
            os.environ[name] = str(threads)
        threadpool_limits(limits=threads)  # and those already loaded


def thread_overrides(overrides: Iterable[str]) -> tuple[str, ...]:
    """The ``num_threads=N`` among command-line ``overrides``: what a script that passes a user's pretraining
    overrides on gives its evaluation commands too, so a job's every process keeps to its share of the cores."""
    return tuple(o for o in overrides if o.partition("=")[0] == "num_threads")


def run_hydra(config_name: str, prog: str, task: Callable, args: list[str]) -> int:
    """Run ``task(cfg)`` as a Hydra app (overrides, ``-m`` multirun, ``--help``, ``--cfg job``)."""
    import hydra

    saved = sys.argv
    sys.argv = [prog, *args]
    try:
        hydra.main(version_base="1.3", config_path=CONFIG_PACKAGE, config_name=config_name)(task)()
    finally:
        sys.argv = saved
    return 0
