"""``data=folder data.path=...``: a folder of images ingested once into a cached store and trained from."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ssl_med.config import ConfigError
from ssl_med.data.sources import folder as folder_module
from ssl_med.data.sources.folder import folder_store, ingest_options
from ssl_med.data.store import ImageStore


def image_folder(root: Path) -> Path:
    """Three greyscale PNGs (a disc of varying size on a gradient) and a file that is not an image."""
    root.mkdir(parents=True)
    y, x = np.mgrid[:64, :64]
    for i, radius in enumerate((12, 18, 24)):
        pixels = (x * 2 + 80 * ((x - 32) ** 2 + (y - 32) ** 2 < radius**2)).clip(0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"case{i}.png")
    (root / "broken.png").write_bytes(b"not a png at all")
    return root


def test_ingests_once_reuses_and_reports_bad_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog) -> None:
    monkeypatch.setenv("SSL_MED_CACHE", str(tmp_path / "cache"))
    images = image_folder(tmp_path / "images")
    with caplog.at_level(logging.INFO, logger=folder_module.__name__):
        store = folder_store(images, progress=False)
    assert sorted(ImageStore(store).manifest) == ["case0", "case1", "case2"]
    report = next(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "3 images written" in report and "skipped" in report and "broken.png" in report, report

    def no_ingest(*args, **kwargs):
        raise AssertionError("an unchanged folder is not ingested again")

    monkeypatch.setattr(folder_module, "ingest", no_ingest)
    assert folder_store(images, progress=False) == store
    monkeypatch.undo()
    monkeypatch.setenv("SSL_MED_CACHE", str(tmp_path / "cache"))

    (images / "broken.png").unlink()  # a changed folder gets a store of its own
    changed = folder_store(images, progress=False)
    assert changed != store and sorted(ImageStore(changed).manifest) == ["case0", "case1", "case2"]
    os.utime(images / "case0.png", ns=(1, 1))
    assert folder_store(images, progress=False) not in (store, changed)
    assert len(list((tmp_path / "cache" / "folders").glob("*.zarr"))) == 3


def test_empty_or_missing_folder_fails_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SSL_MED_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match=r"data\.path="):
        folder_store(tmp_path / "absent", progress=False)
    (tmp_path / "junk").mkdir()
    (tmp_path / "junk" / "a.png").write_bytes(b"junk")
    with pytest.raises(ValueError, match=r"no image could be ingested\n0 images written.*\n  skipped .*a.png"):
        folder_store(tmp_path / "junk", progress=False)
    assert not list((tmp_path / "cache" / "folders").glob("*.zarr")), "nothing half-built is left"
    with pytest.raises(ValueError, match=r"unknown data\.ingest option"):
        ingest_options({"spaceing": [1, 1, 1]})


def test_pretrain_from_a_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ssl_med.train import run as run_module
    from tests.train.test_pretrain import config

    monkeypatch.setenv("SSL_MED_CACHE", str(tmp_path / "cache"))
    images = image_folder(tmp_path / "images")
    with pytest.raises(ConfigError, match="path"):
        config("data=folder")
    cfg = config("data=folder", f"data.path={images}", "data.min_foreground=0", "trainer.max_steps=2")
    assert cfg.experiment == "vit-mae-folder" and cfg.data.ingest["orientation"] == "RAS"
    run_module.pretrain(cfg, tmp_path / "run")
    assert (tmp_path / "run" / "encoder" / "model.safetensors").is_file()
    assert len(list((tmp_path / "cache" / "folders").glob("*.zarr"))) == 1
