"""Fault injection on tiny stores written per test: chunk files deleted, truncated, or with a byte flipped;
and on ``ssl_med`` processes: signals, kills, a save that dies half-way.

``tiny_store`` is a fresh store per test; the helpers come as the ``faults`` fixture (:class:`Faults`).
``processes`` (:class:`Processes`) spawns ``ssl_med`` commands and kills whatever is left at teardown.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from ssl_med.data.layout import Layout
from ssl_med.data.store import ImageStore

CT = "images/ct/0"
PHOTO = "images/photo/0"
STACK = "stacks/stack"


def tiny_volume() -> np.ndarray:
    """``(1, 16, 16, 16)`` int16 CT values whose first 8³ chunk is all air (the fill value: never written)."""
    vol = np.random.default_rng(0).integers(-900, 2000, size=(1, 16, 16, 16)).astype(np.int16)
    vol[:, :8, :8, :8] = -1000
    vol[0, 15, 15, 15] = -1000
    return vol


TINY_LAYOUT = Layout(chunk_2d=8, stack_chunk_bytes=2 * 8 * 8 * 4)


def write_tiny_store(path: Path, layout: Layout = TINY_LAYOUT) -> Path:
    """At ``path``: CT volume ``ct`` (8³ chunks, 7 written), 2D image ``photo`` (12², four 8² tiles)
    and a stack of four 8² float images ``row0..row3`` (two per chunk)."""
    rng = np.random.default_rng(1)
    store = ImageStore(path, mode="a")
    store.add("ct", tiny_volume(), (1.0, 1.0, 1.0), modality="CT", chunks=(1, 8, 8, 8), layout=layout)
    store.add("photo", rng.integers(1, 255, size=(1, 12, 12)).astype(np.uint8), (1.0, 1.0), layout=layout)
    rows = rng.random((4, 1, 8, 8)).astype(np.float32)
    store.record(
        store.write_stack("stack", rows, (1.0, 1.0), names=[f"row{i}" for i in range(4)], layout=layout)
    )
    return path


@pytest.fixture()
def tiny_store(tmp_path: Path) -> Path:
    return write_tiny_store(tmp_path / "tiny.zarr")


def flip_byte(path: Path, offset: int = -10) -> None:
    """Flip one bit of the byte at ``offset`` (default: in the compressed payload, before the checksum)."""
    raw = bytearray(path.read_bytes())
    raw[offset] ^= 0x01
    path.write_bytes(bytes(raw))


def truncate(path: Path, keep: float = 0.5) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: int(len(raw) * keep)])


class Faults:
    """Fault injection helpers (the ``faults`` fixture)."""

    #: fault name -> (injection, the kind of :class:`~ssl_med.data.integrity.ChunkError` it must raise)
    KINDS: ClassVar[dict[str, tuple[Callable[[Path], object], str]]] = {
        "deleted": (Path.unlink, "missing"),
        "truncated": (truncate, "truncated"),
        "emptied": (lambda p: p.write_bytes(b""), "truncated"),
        "flipped": (flip_byte, "corrupted"),
    }
    write_store = staticmethod(write_tiny_store)
    volume = staticmethod(tiny_volume)
    flip_byte = staticmethod(flip_byte)

    @staticmethod
    def chunk_files(store: Path, array: str) -> list[Path]:
        """The chunk files of ``array`` (e.g. ``images/ct/0``), sorted."""
        return sorted(p for p in (store / array / "c").rglob("*") if p.is_file())

    @staticmethod
    def key(store: Path, array: str, path: Path) -> str:
        """The chunk key (``c/0/1/0/1``) of chunk file ``path``."""
        return path.relative_to(store / array).as_posix()

    @staticmethod
    def drop_inventories(store: Path) -> None:
        """Make ``store`` look like one written before chunk inventories existed."""
        for meta in store.rglob("zarr.json"):
            doc = json.loads(meta.read_text())
            if doc.get("node_type") == "array" and doc.get("attributes", {}).pop("ssl_med_chunks", None):
                meta.write_text(json.dumps(doc))


@pytest.fixture()
def faults() -> type[Faults]:
    return Faults


#: a pretraining run of a few seconds on the demo data (overrides of ``ssl_med pretrain``)
TINY_PRETRAIN = (
    "backbone.embed_dim=48", "backbone.depth=1", "objective.decoder_dim=16", "objective.decoder_depth=1",
    "objective.decoder_heads=2", "data.crop_size=[32,32]", "data.batch_size=4", "data.num_workers=0",
    "data.samples_per_epoch=64", "trainer.progress_bar=false", "trainer.preview_every_n_steps=0",
)  # fmt: skip


class Processes:
    """``ssl_med`` commands in fresh interpreters, each in its own session (signals reach only it)."""

    def __init__(self) -> None:
        self.spawned: list[subprocess.Popen[str]] = []

    @staticmethod
    def pretrain_args(run_dir: Path, *overrides: str) -> list[str]:
        """``pretrain`` arguments of the tiny run into ``run_dir``, then ``overrides``."""
        return ["pretrain", *TINY_PRETRAIN, f"hydra.run.dir={run_dir}", *overrides]

    def spawn(self, args: list[str], prelude: str = "") -> subprocess.Popen[str]:
        """``ssl_med *args`` after running the Python code ``prelude`` (fault injection); stdout and
        stderr together in ``proc.stdout``."""
        code = f"{prelude}\nimport sys\nfrom ssl_med.cli import main\nsys.exit(main(sys.argv[1:]))"
        proc = subprocess.Popen(
            [sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            start_new_session=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        self.spawned.append(proc)
        return proc

    def close(self) -> None:
        for proc in self.spawned:
            if proc.poll() is None:
                proc.kill()
            proc.communicate()


@pytest.fixture()
def processes() -> Iterator[Processes]:
    procs = Processes()
    yield procs
    procs.close()
