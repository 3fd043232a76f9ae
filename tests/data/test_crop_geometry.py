"""In-domain crop geometry: small images are scaled up (not padded), ``split=auto`` keeps val/test
out of pretraining, foreground redraws stay within one image, bad crop sizes fail at start-up."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import torch

from ssl_med.data.crops import RandomCropDataset
from ssl_med.data.ingest import ingest
from ssl_med.data.intensity import intensity_window, normalise_intensity
from ssl_med.data.resample import resize_crop


@pytest.fixture(scope="module")
def medmnist_like(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A MedMNIST-style file of 28 px images, bright discs on black (foreground ~ 40 %), ingested."""
    root = tmp_path_factory.mktemp("small")
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:28, :28]
    arrays = {}
    for split, n in (("train", 12), ("val", 4), ("test", 4)):
        r = rng.uniform(6, 12, n)[:, None, None]
        cy, cx = rng.uniform(10, 18, (2, n))[:, :, None, None]
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
        arrays[f"{split}_images"] = (disc * rng.integers(100, 255, (n, 1, 1))).astype(np.uint8)
        arrays[f"{split}_labels"] = rng.integers(0, 2, (n, 1))
    np.savez(root / "tiny.npz", **arrays)
    out = str(root / "tiny.zarr")
    ingest([str(root / "tiny.npz")], out, progress=False, log=lambda _: None)
    return out


def test_small_images_are_scaled_up_to_cover_the_crop(medmnist_like: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="ssl_med.data.crops"):
        ds = RandomCropDataset(medmnist_like, (32, 32), length=16, seed=0)
    assert "smaller than the crop" in caplog.text and "resize" in caplog.text
    assert all(ds[i]["image"].shape == (1, 32, 32) for i in range(8))
    # 28 -> 32 covers the whole image: the crop is the scaled image itself
    name, region = ds.region(0)
    assert [s.stop - s.start for s in region] == [28, 28]
    raw = ds.store.read(name, region).astype(np.float32)
    expected = torch.nn.functional.interpolate(torch.from_numpy(raw)[None], size=(32, 32), mode="bilinear")[0]
    np.testing.assert_allclose(resize_crop(raw, (32, 32)), expected.numpy(), atol=1e-5)
    got, k = ds._crop(0, 0)
    np.testing.assert_allclose(got, normalise_intensity(expected.numpy().round(), intensity_window(ds.metas[k])), atol=1e-6)


def test_resize_crop_matches_an_independent_linear_interpolation() -> None:
    """Bilinear upscaling (half-pixel centres) of a ramp is the ramp sampled at the new centres."""
    ramp = np.tile(np.arange(8, dtype=np.float32), (8, 1))[None]  # (1, 8, 8), value = x
    out = resize_crop(ramp, (16, 16))[0]
    centres = np.clip((np.arange(16) + 0.5) / 2 - 0.5, 0, 7)  # source coordinates of the new pixels
    np.testing.assert_allclose(out[3], centres, atol=1e-6)
    ints = resize_crop(np.full((1, 4, 4), 7, dtype=np.int16), (9, 9))
    assert ints.dtype == np.int16 and (ints == 7).all()


def test_small_images_error_and_pad_modes(medmnist_like: str, caplog: pytest.LogCaptureFixture) -> None:
    with pytest.raises(ValueError, match=r"smaller than the crop.*tiny_\w+_\d+.*data.small_images"):
        RandomCropDataset(medmnist_like, (32, 32), small_images="error")
    with caplog.at_level(logging.WARNING, logger="ssl_med.data.crops"):
        ds = RandomCropDataset(medmnist_like, (32, 32), small_images="pad")
    assert "padding" in caplog.text
    assert ds[0]["image"][:, 28:, :].abs().sum() == 0, "pad mode pads at the end"
    with pytest.raises(ValueError, match=r"data\.crop_size"):
        RandomCropDataset(medmnist_like, (-32, 32))
    with pytest.raises(ValueError, match=r"data\.crop_size"):
        RandomCropDataset(medmnist_like, (0, 32))


def test_split_auto_trains_on_train_only(medmnist_like: str) -> None:
    auto = RandomCropDataset(medmnist_like, (28, 28), split="auto")
    assert auto.split == "train" and {m.split for m in auto.metas} == {"train"} and len(auto.names) == 12
    everything = RandomCropDataset(medmnist_like, (28, 28), split=None)
    assert len(everything.names) == 20


def test_foreground_redraws_stay_in_the_first_image(medmnist_like: str) -> None:
    ds = RandomCropDataset(medmnist_like, (16, 16), split=None, min_foreground=0.9, max_tries=5, length=64)
    for index in range(10):
        names = {ds.region(index, attempt)[0] for attempt in range(5)}
        assert len(names) == 1, "attempts of one draw move the crop, not the image"
        assert ds.region(index, 5)[0] in ds.names  # the next draw (on_error redraw) may pick another image


def test_pretraining_on_val_and_test_warns(medmnist_like: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from ssl_med.config import DataConfig
    from ssl_med.data.datamodule import CropDataModule

    cfg = DataConfig(source="store", store=medmnist_like, crop_size=[28, 28], split=None, num_workers=0)
    with caplog.at_level(logging.WARNING, logger="ssl_med.data.datamodule"):
        CropDataModule(cfg, lambda s: s).setup()
    assert "not held out" in caplog.text and "test/val" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ssl_med.data.datamodule"):
        CropDataModule(DataConfig(source="store", store=medmnist_like, crop_size=[28, 28], num_workers=0), lambda s: s).setup()
    assert "not held out" not in caplog.text


def test_auto_window_reads_8bit_images_as_the_medmnist_evaluators_do(medmnist_like: str, tmp_path: Path) -> None:
    """``window_mode="auto"`` scales a uint8 image by 255 (its brightness kept), exactly the values the
    evaluators read for the same image; ``"image"`` stretches each image to its own percentiles, so
    two discs of different brightness both reach 1."""
    from ssl_med.evaluators.datasets import load_medmnist

    src = str(Path(medmnist_like).with_suffix(".npz"))
    cfg = {"name": "tiny", "path": src, "task": None, "spatial_dims": None, "image_size": 28, "subset": None, "channel_names": None}
    evaluated = load_medmnist(cfg).images["train"]
    auto = RandomCropDataset(medmnist_like, (28, 28), length=8, seed=0, split="train", window_mode="auto")
    stretched = RandomCropDataset(medmnist_like, (28, 28), length=8, seed=0, split="train", window_mode="image")
    peaks = set()
    for i in range(8):
        name, _ = auto.region(i)
        index = int(name.rsplit("_", 1)[1])
        np.testing.assert_allclose(auto[i]["image"].numpy(), evaluated[index].numpy(), atol=1e-6)
        peaks.add(round(float(auto[i]["image"].max()), 3))
        assert float(stretched[i]["image"].max()) == pytest.approx(1.0)
    assert len(peaks) > 1  # brightness differs between images under "auto", not under "image"


def test_intensity_window_modes_and_their_errors(medmnist_like: str, tmp_path: Path) -> None:
    from ssl_med.data.store import ImageStore

    meta = ImageStore(medmnist_like).manifest["tiny_train_00000"]
    np.testing.assert_array_equal(intensity_window(meta, "dtype"), [[0, 255]])
    np.testing.assert_array_equal(intensity_window(meta, "auto"), intensity_window(meta, "dtype"))
    np.testing.assert_array_equal(intensity_window(meta, "image"), [[meta.intensity["p0.5"][0], meta.intensity["p99.5"][0]]])
    with pytest.raises(ValueError, match=r"data\.intensity_window must be one of auto, image, dtype"):
        intensity_window(meta, "minmax")
    # float images have no dtype range: auto keeps their percentiles, dtype is refused naming the image
    store = ImageStore(str(tmp_path / "float.zarr"), mode="w")
    store.add("mr", np.linspace(0, 7, 16 * 16, dtype=np.float32).reshape(1, 16, 16), (1.0, 1.0))
    float_meta = ImageStore(str(tmp_path / "float.zarr")).manifest["mr"]
    np.testing.assert_array_equal(intensity_window(float_meta, "auto"), intensity_window(float_meta, "image"))
    with pytest.raises(ValueError, match=r"image 'mr' of .*float\.zarr: data.intensity_window=dtype needs integer images, this one is stored as float32"):
        RandomCropDataset(str(tmp_path / "float.zarr"), (8, 8), num_channels=None, window_mode="dtype")


def test_sampling_weight_counts_the_positions_of_the_region_read(tmp_path: Path) -> None:
    """A 20 x 40 image under a 32 x 32 crop is read as 20 x 20 windows (scaled by 1.6): 21 positions,
    against one for a 32 x 32 image, so it is drawn 21 times as often and every window start is drawn."""
    from PIL import Image

    rng = np.random.default_rng(0)
    (tmp_path / "png").mkdir()
    Image.fromarray(rng.integers(0, 256, (20, 40), dtype=np.uint8)).save(tmp_path / "png" / "wide.png")
    Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8)).save(tmp_path / "png" / "square.png")
    ingest([str(tmp_path / "png")], str(tmp_path / "s.zarr"), progress=False, log=lambda _: None)
    ds = RandomCropDataset(str(tmp_path / "s.zarr"), (32, 32), length=4400, seed=0)
    k = next(k for k, n in enumerate(ds.names) if "wide" in n)
    assert ds.window(ds.metas[k]) == ds.windows[k] == (20, 20) and ds._num_positions(k) == 21
    regions = [ds.region(i) for i in range(len(ds))]
    starts = {r[1].start for n, r in regions if "wide" in n}
    assert starts == set(range(21)), "every window position of the wide image is drawn"
    share = np.mean(["wide" in n for n, _ in regions])
    assert abs(share - 21 / 22) < 0.02, share
