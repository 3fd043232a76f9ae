"""Viewable stores: the store root is an OME-Zarr 0.5 collection (validated with yaozarrs), large
images get a multiscale pyramid for viewers, label maps point back at their image; training and
every reader see level 0 only, unchanged."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from ssl_med.data import pyramid
from ssl_med.data.store import ImageStore
from ssl_med.data.verify import verify


def _attrs(path: Path) -> dict:
    return json.loads(path.read_text())["attributes"]


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, np.ndarray]]:
    """A generated store: a large anisotropic volume with a label map, a small 2D image, a stack."""
    rng = np.random.default_rng(0)
    data = {
        "vol": rng.normal(100, 20, size=(2, 24, 300, 270)).astype(np.float32),
        "seg": rng.integers(0, 4, size=(24, 300, 270)).astype(np.uint8),
        "img": rng.integers(0, 4000, size=(1, 40, 50)).astype(np.int16),
    }
    path = str(tmp_path_factory.mktemp("view") / "s.zarr")
    s = ImageStore(path, mode="a")
    s.add("vol", data["vol"], (3.0, 1.0, 1.0), labels={"seg": data["seg"]}, origin=(5.0, -2.0, 1.0))
    s.add("img", data["img"], (0.5, 0.5), unit="")
    s.record(s.write_stack("rows", rng.integers(0, 255, size=(4, 1, 28, 28), dtype=np.uint8), (1.0, 1.0),
                           names=[f"r{i}" for i in range(4)]))  # fmt: skip
    return path, data


def test_store_root_validates_as_ome_zarr_0_5(store) -> None:
    """yaozarrs (dev extra) accepts the root: a bioformats2raw-layout collection listing every image
    group; each image, its labels group and label image validate too."""
    yaozarrs = pytest.importorskip("yaozarrs")
    path, _ = store
    yaozarrs.validate_zarr_store(path)
    root = Path(path)
    assert _attrs(root / "zarr.json")["ome"] == {"version": "0.5", "bioformats2raw.layout": 3}
    assert _attrs(root / "OME/zarr.json")["ome"]["series"] == ["images/vol", "images/img"]  # not stacks
    for node in ("images/vol", "images/img", "images/vol/labels", "images/vol/labels/seg"):
        yaozarrs.validate_ome_json((root / node / "zarr.json").read_text())
    label = _attrs(root / "images/vol/labels/seg/zarr.json")["ome"]["image-label"]
    assert label["source"] == {"image": "../../"}
    assert [c["label-value"] for c in label["colors"]] == [0, 1, 2, 3]
    assert label["colors"][0]["rgba"][3] == 0  # background transparent


def test_pyramid_levels_and_transforms(store) -> None:
    """In-plane halving only while Z is coarse; scales double, averaged levels shift by half a voxel."""
    path, data = store
    s = ImageStore(path)
    assert s.root["images/vol/1"].shape == (2, 24, 150, 135)
    assert "2" not in s.root["images/vol"] and "1" not in s.root["images/img"]  # small image: one level
    ds = _attrs(Path(path) / "images/vol/zarr.json")["ome"]["multiscales"][0]["datasets"]
    assert [d["path"] for d in ds] == ["0", "1"]
    assert ds[1]["coordinateTransformations"] == [
        {"type": "scale", "scale": [1.0, 3.0, 2.0, 2.0]},
        {"type": "translation", "translation": [0.0, 5.0, -1.5, 1.5]},
    ]
    np.testing.assert_allclose(
        s.root["images/vol/1"][:, 3, 10, 20], data["vol"][:, 3, 20:22, 40:42].mean(axis=(1, 2)), rtol=1e-6
    )
    seg1 = s.root["images/vol/labels/seg/1"][...]
    np.testing.assert_array_equal(seg1[0], data["seg"][:, ::2, ::2])  # labels strided, never averaged
    label_ds = _attrs(Path(path) / "images/vol/labels/seg/zarr.json")["ome"]["multiscales"][0]["datasets"]
    assert label_ds[1]["coordinateTransformations"][1]["translation"] == [0.0, 5.0, -2.0, 1.0]


def test_readers_and_crops_read_level_0_exactly(store) -> None:
    """Every engine reads level 0, voxel for voxel: the pyramid never alters what training sees."""
    path, data = store
    region = (slice(3, 17), slice(101, 263), slice(7, 270))
    for engine in ("direct", "zarr"):
        s = ImageStore(path, engine=engine)
        np.testing.assert_array_equal(s.read("vol"), data["vol"])
        np.testing.assert_array_equal(s.read("vol", region), data["vol"][(slice(None), *region)])
        np.testing.assert_array_equal(s.read_label("vol", "seg", region)[0], data["seg"][region])
        np.testing.assert_array_equal(s.read("img"), data["img"])
        assert s.array_path("vol") == "images/vol/0"


def test_level_plan() -> None:
    assert pyramid.levels_for((1, 200, 200), (1.0, 1.0), None) == []
    assert pyramid.levels_for((1, 200, 200), (1.0, 1.0), True) == [(2, 2), (4, 4)]
    assert pyramid.levels_for((1, 2000, 600), (1.0, 1.0), False) == []
    assert pyramid.levels_for((1, 600, 600, 600), (1.0, 1.0, 1.0), None) == [(2, 2, 2), (4, 4, 4)]
    # thick slices: Z is halved only once the in-plane voxels are within a factor 2 of it
    assert pyramid.levels_for((1, 100, 2048, 2048), (5.0, 1.0, 1.0), None) == [
        (1, 2, 2),
        (1, 4, 4),
        (2, 8, 8),
    ]
    odd = np.arange(2 * 5 * 3, dtype=np.uint8).reshape(2, 5, 3)
    (half,) = pyramid.levels(odd, [(2, 2)])
    assert half.shape == pyramid.expected_shape(odd.shape, (2, 2)) == (2, 3, 2)
    assert half.dtype == np.uint8 and half[0, 0, 0] == round(np.mean([0, 1, 3, 4]))


def test_verify_checks_pyramid_levels(store, tmp_path) -> None:
    """Levels pass verify; a lost level chunk or level array is reported, not ignored."""
    path, _ = store
    assert verify(path).ok
    copy = tmp_path / "c.zarr"
    shutil.copytree(path, copy)
    next(p for p in (copy / "images/vol/1/c").rglob("*") if p.is_file()).unlink()
    report = verify(str(copy))
    assert not report.ok and "images/vol/1" in report.summary() and report.damaged == {"vol"}
    shutil.rmtree(copy / "images/vol/labels/seg/1")
    assert "pyramid level images/vol/labels/seg/1 is missing" in verify(str(copy)).summary()


def test_ingest_pyramid_flags(tmp_path) -> None:
    """``ssl_med ingest``: levels by default for a large image, ``--no-pyramid`` / ``--pyramid``."""
    from ssl_med.commands.ingest import COMMAND

    big = np.random.default_rng(1).random((600, 520)).astype(np.float32)
    np.save(tmp_path / "big.npy", big)
    np.save(tmp_path / "small.npy", big[:100, :100])
    for flag, expect_big, expect_small in ((None, True, False), ("--no-pyramid", False, False),
                                           ("--pyramid", True, True)):  # fmt: skip
        out = tmp_path / f"{flag}.zarr"
        args = [str(tmp_path / "big.npy"), str(tmp_path / "small.npy"), "--out", str(out), "--no-progress"]
        assert COMMAND.run(args + ([flag] if flag else []) + ["--verify"]) == 0
        assert (out / "images/big/1").is_dir() == expect_big and (
            out / "images/small/1"
        ).is_dir() == expect_small
        np.testing.assert_array_equal(ImageStore(str(out)).read("big")[0], big)


def test_stores_without_collection_metadata_still_read(store, tmp_path) -> None:
    """A store written before the root was a collection (no ``ome`` root attributes, no ``OME``
    group, single-level images) reads and verifies as before."""
    path, data = store
    old = tmp_path / "old.zarr"
    shutil.copytree(path, old)
    shutil.rmtree(old / "OME")
    meta = json.loads((old / "zarr.json").read_text())
    del meta["attributes"]["ome"]
    (old / "zarr.json").write_text(json.dumps(meta))
    s = ImageStore(str(old))
    np.testing.assert_array_equal(s.read("vol"), data["vol"])
    assert verify(str(old)).ok


def test_real_brats_store_validates(brats_store) -> None:
    """A real BraTS case (../shared/data; skipped when absent) ingested as usual: the root validates."""
    yaozarrs = pytest.importorskip("yaozarrs")
    yaozarrs.validate_zarr_store(brats_store)
    label = _attrs(Path(brats_store) / "images/BraTS20_Training_001/labels/seg/zarr.json")["ome"]
    assert label["image-label"]["source"] == {"image": "../../"}


def test_real_brats_pyramid_validates(shared_data, tmp_path) -> None:
    """The same case with ``pyramid=True``: levels validate, level 0 is the data read without them."""
    yaozarrs = pytest.importorskip("yaozarrs")
    from ssl_med.data.ingest import IngestOptions, ingest

    case = shared_data / "brats2020_sample"
    ingest([str(case)], str(tmp_path / "p.zarr"), IngestOptions(pyramid=True), progress=False)
    ingest([str(case)], str(tmp_path / "n.zarr"), IngestOptions(pyramid=False), progress=False)
    yaozarrs.validate_zarr_store(str(tmp_path / "p.zarr"))
    with_levels, without = ImageStore(str(tmp_path / "p.zarr")), ImageStore(str(tmp_path / "n.zarr"))
    name = next(iter(with_levels))
    assert "1" in with_levels.root[f"images/{name}"] and "1" not in without.root[f"images/{name}"]
    np.testing.assert_array_equal(with_levels.read(name), without.read(name))
    assert verify(str(tmp_path / "p.zarr")).ok
