"""``ssl_med ingest --verify --repair`` re-ingests damaged images from their recorded, unchanged sources."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ssl_med.commands.ingest import run as ingest_command
from ssl_med.data.store import ImageStore

VOL = "images/vol/0"


def ingested(tmp_path: Path) -> tuple[Path, Path, np.ndarray]:
    """A store ingested (8³ chunks) from ``vol.npy`` and ``other.npy`` written in ``tmp_path``."""
    rng = np.random.default_rng(3)
    vol = rng.integers(1, 1000, size=(16, 16, 16)).astype(np.int16)
    src = tmp_path / "src"
    src.mkdir()
    np.save(src / "vol.npy", vol)
    np.save(src / "other.npy", vol[::-1].copy())
    store = tmp_path / "s.zarr"
    assert ingest_command([str(src), "--out", str(store), "--chunk", "8", "--no-progress"]) == 0
    return store, src / "vol.npy", ImageStore(str(store)).read("vol")


def test_repair_reingests_a_damaged_image_from_its_source(tmp_path, faults, capsys) -> None:
    store, _, before = ingested(tmp_path)
    faults.flip_byte(faults.chunk_files(store, VOL)[2])
    faults.chunk_files(store, VOL)[5].unlink()
    assert ingest_command(["--verify", "--repair", "--out", str(store)]) == 0
    out = capsys.readouterr().out
    assert "2 problems" in out and "repaired vol" in out and "1 images repaired, 0 not repairable" in out
    assert "after repair: 2 images checked: OK" in out
    assert ingest_command(["--verify", "--out", str(store)]) == 0
    np.testing.assert_array_equal(ImageStore(str(store)).read("vol"), before)


def test_repair_refuses_a_source_that_is_gone_or_changed(tmp_path, faults, capsys) -> None:
    store, source, _ = ingested(tmp_path)
    faults.chunk_files(store, VOL)[0].unlink()
    source.unlink()
    assert ingest_command(["--verify", "--repair", "--out", str(store)]) == 1
    out = capsys.readouterr().out
    assert (
        f"not repairable vol: source {source} is gone" in out
        and "after repair: 2 images checked: 1 problems" in out
    )
    np.save(source, np.zeros((16, 16, 16), np.int16))  # back, but not the file the image was read from
    assert ingest_command(["--verify", "--repair", "--out", str(store)]) == 1
    assert f"not repairable vol: source {source} changed" in capsys.readouterr().out


def test_repair_rewrites_a_damaged_stack_from_its_medmnist_file(tmp_path, faults, capsys) -> None:
    rng = np.random.default_rng(4)
    images = rng.integers(1, 255, size=(6, 8, 8)).astype(np.uint8)
    np.savez(tmp_path / "mn.npz", train_images=images, train_labels=np.arange(6)[:, None])
    store = tmp_path / "s.zarr"
    assert ingest_command([str(tmp_path / "mn.npz"), "--out", str(store), "--no-progress"]) == 0
    capsys.readouterr()
    faults.flip_byte(faults.chunk_files(store, "stacks/mn_train")[0])
    assert ingest_command(["--verify", "--repair", "--out", str(store)]) == 0
    out = capsys.readouterr().out
    assert "6 images repaired, 0 not repairable" in out and "after repair: 6 images checked: OK" in out
    np.testing.assert_array_equal(ImageStore(str(store)).read("mn_train_00003")[0], images[3])
