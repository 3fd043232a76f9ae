"""Images larger than the crop: cropped at full resolution by default, or with ``large_images="resize"``
scaled down isotropically to cover the crop, a square image becoming exactly the crop, on the evaluators'
resampling rule (area averaging), so that pretraining sees what evaluation reads."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from ssl_med.data.crops import RandomCropDataset
from ssl_med.data.ingest import ingest
from ssl_med.data.intensity import intensity_window, normalise_intensity


def _ingested(root: Path, shape: tuple[int, ...], n: int = 6) -> str:
    rng = np.random.default_rng(0)
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, *shape)).astype(np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, (n, 1))
    np.savez(root / "large.npz", **arrays)
    ingest([str(root / "large.npz")], str(root / "large.zarr"), progress=False, log=lambda _: None)
    return str(root / "large.zarr")


@pytest.fixture(scope="module")
def square_64(tmp_path_factory: pytest.TempPathFactory) -> str:
    return _ingested(tmp_path_factory.mktemp("square"), (64, 64))


def test_default_crops_large_images_at_full_resolution(square_64: str) -> None:
    ds = RandomCropDataset(square_64, (28, 28), length=8, seed=0)
    _, region = ds.region(0)
    assert [s.stop - s.start for s in region] == [28, 28]
    assert ds._num_positions(0) == 37 * 37


def test_resize_reads_the_whole_square_image_at_the_evaluators_scale(square_64: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="ssl_med.data.crops"):
        ds = RandomCropDataset(square_64, (28, 28), length=8, seed=0, large_images="resize")
    assert "larger than the crop" in caplog.text and "data.large_images=resize" in caplog.text
    assert ds._num_positions(0) == 1  # one position: the whole image
    name, region = ds.region(3)
    assert [(s.start, s.stop) for s in region] == [(0, 64), (0, 64)]
    got, k = ds._crop(3, 0)
    whole = torch.from_numpy(ds.store.read(name, region).astype(np.float32))[None]
    expected = torch.nn.functional.adaptive_avg_pool2d(whole, (28, 28))[0].numpy().round()  # area averaging
    np.testing.assert_allclose(got, normalise_intensity(expected, intensity_window(ds.metas[k])), atol=1e-6)
    assert ds[0]["image"].shape == (1, 28, 28)


def test_resize_keeps_the_aspect_ratio_and_leaves_covering_images_alone(tmp_path: Path) -> None:
    wide = _ingested(tmp_path, (40, 24), n=2)
    ds = RandomCropDataset(wide, (12, 12), length=4, seed=0, large_images="resize")
    # scaled by max(12/40, 12/24) = 1/2: a 24 x 24 region of the 40 x 24 image becomes the 12 x 12 crop
    assert ds.window(ds.metas[0]) == (24, 24)
    _, region = ds.region(1)
    assert [s.stop - s.start for s in region] == [24, 24] and region[1] == slice(0, 24)
    assert ds._num_positions(0) == 17
    assert ds[0]["image"].shape == (1, 12, 12)
    covering = RandomCropDataset(wide, (12, 24), length=4, seed=0, large_images="resize")
    assert covering.window(covering.metas[0]) == (12, 24)  # one axis already fits: a plain crop


def test_resize_scales_volumes_and_names_a_bad_option(tmp_path: Path) -> None:
    volumes = _ingested(tmp_path, (16, 16, 16), n=2)
    ds = RandomCropDataset(volumes, (8, 8, 8), length=4, seed=0, large_images="resize")
    assert ds.window(ds.metas[0]) == (16, 16, 16) and ds[0]["image"].shape == (1, 8, 8, 8)
    region_crop = RandomCropDataset(volumes, (8, 16, 16), length=4, seed=0, large_images="resize")
    assert region_crop.window(region_crop.metas[0]) == (8, 16, 16)  # VoCo-style region: covered at scale 1
    with pytest.raises(ValueError, match=r"data\.large_images"):
        RandomCropDataset(volumes, (8, 8, 8), large_images="shrink")
