"""Shared fixtures: paths to ../shared/data (skipped when absent) and the demo stores."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("SSL_MED_SHARED_DATA", REPO.parent / "shared" / "data"))


@pytest.fixture(autouse=True)
def _one_thread():
    """One intra-op thread per test: the tests use tiny models, for which two OpenMP threads on a
    shared 2-core machine oversubscribe the cores and run many times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """``../shared/data`` (real labelled medical data); tests using it skip when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session", autouse=True)
def _cache_dir(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep the demo-store cache inside the test session unless the user set one."""
    os.environ.setdefault("SSL_MED_CACHE", str(tmp_path_factory.mktemp("ssl_med_cache")))


@pytest.fixture(scope="session")
def demo_store_2d() -> str:
    from ssl_med.data.sources.demo import demo_store

    return demo_store(2)


@pytest.fixture(scope="session")
def demo_store_3d() -> str:
    from ssl_med.data.sources.demo import demo_store

    return demo_store(3)


def _fit_objective(
    obj: torch.nn.Module, batches: Iterable[dict], steps: int, opt: torch.optim.Optimizer
) -> tuple[list[float], list[torch.Tensor]]:
    """``steps`` training steps of ``obj`` on the first ``steps`` of ``batches``: forward, backward,
    ``opt.step()``, ``on_train_step_end(step, steps)``. Returns each step's loss and detached embeddings."""
    losses, embeddings = [], []
    for step, batch in zip(range(1, steps + 1), batches):
        out = obj(batch)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        obj.on_train_step_end(step, steps)
        losses.append(out.loss.item())
        embeddings.append(out.embeddings.detach())
    assert len(losses) == steps, f"only {len(losses)} of {steps} batches"
    return losses, embeddings


@pytest.fixture()
def fit_objective() -> Callable[..., tuple[list[float], list[torch.Tensor]]]:
    """The shared training loop of the learning tests (see :func:`_fit_objective`)."""
    return _fit_objective


def _run_cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """``ssl_med *args`` in a fresh interpreter (the installed entry point's module), output captured."""
    command = [sys.executable, "-m", "ssl_med.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout)


@pytest.fixture()
def run_cli() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Runs the ``ssl_med`` command in a subprocess (see :func:`_run_cli`)."""
    return _run_cli
