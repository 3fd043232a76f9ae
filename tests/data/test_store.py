"""The image store and crop sampling: exact crops across chunk boundaries, demo data, sharding."""

from __future__ import annotations

import numpy as np
import pytest

from ssl_med.data.crops import EpochSampler, RandomCropDataset, match_channels
from ssl_med.data.intensity import intensity_window, normalise_intensity
from ssl_med.data.store import ImageStore


@pytest.fixture()
def volume_store(tmp_path):
    rng = np.random.default_rng(0)
    vol = rng.integers(-1000, 2000, size=(2, 37, 41, 45)).astype(np.int16)
    store = ImageStore(tmp_path / "s.zarr", mode="a")
    store.add("ct", vol, (2.0, 0.8, 0.8), modality="CT", channel_names=("a", "b"), chunks=(1, 16, 16, 16))
    return store, vol


def test_crop_equals_source_across_chunk_boundaries(volume_store) -> None:
    store, vol = volume_store
    reopened = ImageStore(store.path)
    for region in [
        (slice(10, 30), slice(14, 35), slice(0, 45)),  # crosses z/y chunk borders, full x
        (slice(15, 17), slice(31, 33), slice(31, 33)),  # 2x2x2 around a chunk corner
        (slice(0, 37), slice(0, 41), slice(44, 45)),
    ]:
        np.testing.assert_array_equal(reopened.read("ct", region), vol[(slice(None), *region)])


def test_manifest_and_metadata(volume_store) -> None:
    store, vol = volume_store
    meta = ImageStore(store.path).manifest["ct"]
    assert meta.shape == vol.shape and meta.spacing == (2.0, 0.8, 0.8)
    assert meta.modality == "CT" and meta.channel_names == ("a", "b")
    np.testing.assert_allclose(meta.intensity["p99.5"], np.percentile(vol.reshape(2, -1), 99.5, axis=1))


def test_bad_images_are_refused(tmp_path) -> None:
    store = ImageStore(tmp_path / "s.zarr", mode="a")
    with pytest.raises(ValueError, match="no finite values"):
        store.add("nan", np.full((1, 4, 4), np.nan, dtype=np.float32), (1.0, 1.0))
    with pytest.raises(ValueError, match="expected"):
        store.add("flat", np.zeros((4, 4)), (1.0,))
    with pytest.raises(ValueError, match="spacing"):
        store.add("sp", np.zeros((1, 4, 4)), (1.0,))
    assert len(store) == 0
    with pytest.raises(FileNotFoundError):
        ImageStore(tmp_path / "missing.zarr")


def test_random_crops_are_real_and_deterministic(volume_store) -> None:
    store, vol = volume_store
    ds = RandomCropDataset(store.path, (8, 8, 8), num_channels=None, seed=3)
    name, region = ds.region(5)
    assert name == "ct"
    expect = normalise_intensity(vol[(slice(None), *region)], intensity_window(store.manifest["ct"]))
    np.testing.assert_allclose(ds[5]["image"].numpy(), expect)
    assert ds[5]["image"].shape == (2, 8, 8, 8)
    np.testing.assert_array_equal(
        ds[5]["image"].numpy(), RandomCropDataset(store.path, (8, 8, 8), None, seed=3)[5]["image"].numpy()
    )


def test_2d_slices_from_volumes_and_padding(volume_store) -> None:
    store, _ = volume_store
    ds = RandomCropDataset(store.path, (64, 16), num_channels=1, small_images="pad")
    x = ds[0]["image"]
    assert x.shape == (1, 64, 16)  # y is only 41 long: zero-padded
    assert float(x[:, 41:].abs().sum()) == 0.0
    resized = RandomCropDataset(store.path, (64, 16), num_channels=1)  # default: scaled up, 41 x 11 -> 64 x 16
    _, region = resized.region(0)
    assert [s.stop - s.start for s in region] == [1, 41, 11]
    assert resized[0]["image"].shape == (1, 64, 16)


def test_channel_matching() -> None:
    x = np.arange(2 * 3 * 3, dtype=np.float32).reshape(2, 3, 3)
    np.testing.assert_allclose(match_channels(x, 1), x.mean(0, keepdims=True))
    assert match_channels(x[:1], 3).shape == (3, 3, 3)
    with pytest.raises(ValueError, match="cannot map"):
        match_channels(x, 3)


def test_epoch_sampler_shards_without_overlap_and_continues() -> None:
    consumed = {"n": 0}
    ranks = [EpochSampler(12, r, 3, lambda: consumed["n"]) for r in range(3)]
    first = [list(s) for s in ranks]
    assert sorted(sum(first, [])) == list(range(12)) and all(len(f) == 4 for f in first)
    consumed["n"] = 12  # one epoch later (or after a resume at that step)
    assert sorted(sum((list(s) for s in ranks), [])) == list(range(12, 24))


def test_demo_stores(demo_store_2d: str, demo_store_3d: str) -> None:
    two = ImageStore(demo_store_2d).manifest
    assert {"mni152_t1", "retina_fundus", "ihc_histology", "dicom_ct", "dicom_mr"} <= set(two)
    assert two["dicom_ct"].modality == "CT" and two["retina_fundus"].channel_names == ("R", "G", "B")
    three = ImageStore(demo_store_3d).manifest["mni152_t1"]
    assert three.shape == (1, 189, 233, 197) and three.spacing == (1.0, 1.0, 1.0)
    crop = RandomCropDataset(demo_store_3d, (32, 32, 32))[0]["image"]
    assert crop.shape == (1, 32, 32, 32) and 0.0 <= float(crop.min()) and float(crop.max()) <= 1.0
