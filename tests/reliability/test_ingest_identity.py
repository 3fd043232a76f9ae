"""Ingest is idempotent by content: the same file under any root, or twice in one run, is stored once;
a different file with a taken name is stored beside it, never over it."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ssl_med.data.ingest import ingest
from ssl_med.data.store import ImageStore
from ssl_med.data.verify import verify


def write_site(root: Path, names: dict[str, int]) -> Path:
    """``root/<name>.npy`` for each ``{name: seed}``: a small 2D image per seed."""
    root.mkdir(parents=True, exist_ok=True)
    for name, seed in names.items():
        np.save(root / f"{name}.npy", np.random.default_rng(seed).random((12, 10), dtype=np.float32))
    return root


@pytest.fixture()
def sites(tmp_path: Path) -> tuple[Path, Path]:
    """``siteA`` (x, y) and ``siteB`` (an x with other content, z)."""
    return write_site(tmp_path / "siteA", {"x": 1, "y": 2}), write_site(tmp_path / "siteB", {"x": 3, "z": 4})


def stored(out: Path) -> dict[str, np.ndarray]:
    store = ImageStore(out)
    return {name: store.read(name) for name in store.manifest}


def test_second_root_adds_only_its_new_files(sites, tmp_path: Path) -> None:
    site_a, site_b = sites
    out = tmp_path / "s.zarr"
    first = ingest([str(site_a)], str(out), progress=False)
    assert first.written == 2
    before = stored(out)

    again = ingest([str(site_a), str(site_b)], str(out), progress=False)
    assert (again.written, again.present) == (2, 2)
    assert "2 images written, 2 already in the store" in again.summary()
    images = stored(out)
    assert len(images) == 4 and all(np.array_equal(images[n], before[n]) for n in before)  # x and y kept
    digests = [m.content_hash for m in ImageStore(out).manifest.values()]
    assert len(set(digests)) == 4 and all(d.startswith("sha256:") for d in digests)
    assert verify(str(out)).ok


def test_the_same_files_under_another_root_are_a_no_op(sites, tmp_path: Path) -> None:
    site_a, _ = sites
    copy = shutil.copytree(site_a, tmp_path / "elsewhere" / "renamed_site")
    out = tmp_path / "s.zarr"
    ingest([str(site_a)], str(out), progress=False)
    report = ingest([str(copy)], str(out), progress=False)
    assert (report.written, report.present) == (0, 2) and len(ImageStore(out)) == 2


def test_a_different_file_with_a_taken_name_is_stored_beside_it(sites, tmp_path: Path) -> None:
    site_a, site_b = sites
    out = tmp_path / "s.zarr"
    ingest([str(site_a)], str(out), progress=False)
    x_before = ImageStore(out).read("x")
    report = ingest([str(site_b)], str(out), progress=False)
    store = ImageStore(out)
    assert report.written == 2 and set(store.manifest) == {"x", "y", "x_2", "z"}
    np.testing.assert_array_equal(store.read("x"), x_before)
    np.testing.assert_array_equal(store.read("x_2")[0], np.load(site_b / "x.npy"))


@pytest.mark.parametrize("workers", [1, 2])
def test_two_copies_in_one_run_are_stored_once(workers: int, sites, tmp_path: Path) -> None:
    site_a, _ = sites
    copy = shutil.copytree(site_a, tmp_path / "copy")
    out = tmp_path / "s.zarr"
    report = ingest([str(site_a), str(copy)], str(out), workers=workers, progress=False)
    assert (report.written, report.present) == (2, 2)
    store = ImageStore(out)
    assert len(store) == 2 and store.stored_names() == sorted(store.manifest)  # the copies' arrays are gone
    assert verify(str(out)).ok


def test_a_store_without_digests_still_matches_by_name(sites, tmp_path: Path) -> None:
    site_a, _ = sites
    out = tmp_path / "s.zarr"
    ingest([str(site_a)], str(out), progress=False)
    meta_file = out / "zarr.json"
    doc = json.loads(meta_file.read_text())
    for entry in doc["attributes"]["ssl_med"]["images"].values():
        entry.pop("content_hash")
    meta_file.write_text(json.dumps(doc))
    report = ingest([str(site_a)], str(out), progress=False)
    assert (report.written, report.present) == (0, 2) and len(ImageStore(out)) == 2
