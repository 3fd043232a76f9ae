"""Reading crops from stores: read engines, sharding, fsspec URLs, OME metadata, DataLoader workers,
foreground-aware sampling, the labels a store keeps and the ``ssl_med ingest`` command."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from torch.utils.data import DataLoader

from ssl_med.data.crops import RandomCropDataset
from ssl_med.data.intensity import normalise_batch
from ssl_med.data.layout import Layout
from ssl_med.data.store import ImageStore

REGIONS = [
    (slice(10, 30), slice(14, 35), slice(0, 45)),
    (slice(15, 17), slice(31, 33), slice(31, 33)),  # a chunk corner
    (slice(0, 37), slice(0, 41), slice(40, 45)),  # the partial edge chunks
    (slice(30, 37), slice(0, 5), slice(0, 5)),  # chunks never written (all fill value)
]


@pytest.fixture()
def volume() -> np.ndarray:
    vol = np.random.default_rng(0).integers(-1000, 2000, size=(2, 37, 41, 45)).astype(np.int16)
    vol[:, 32:, :16, :16] = 0  # whole chunks equal to the fill value are not stored
    return vol


@pytest.mark.parametrize("engine", ["direct", "zarr"])
def test_engines_read_exact_crops_across_chunk_boundaries(tmp_path, volume, engine) -> None:
    store = ImageStore(tmp_path / "s.zarr", mode="a")
    store.add("v", volume, (1.0, 1.0, 1.0), layout=Layout(chunk_3d=16))
    assert not (tmp_path / "s.zarr/images/v/0/c/0/2/0/0").exists()
    reader = ImageStore(store.path, engine=engine)
    for region in REGIONS:
        np.testing.assert_array_equal(reader.read("v", region), volume[(slice(None), *region)])


def test_float_images_and_nan_fill(tmp_path) -> None:
    img = np.random.default_rng(1).normal(size=(1, 300, 270)).astype(np.float32)
    img[0, :5, :5] = np.nan
    store = ImageStore(tmp_path / "f.zarr", mode="a")
    store.add("f", img, (0.5, 0.5))
    got = ImageStore(store.path, engine="direct").read("f", (slice(0, 290), slice(250, 270)))
    np.testing.assert_array_equal(got, img[:, :290, 250:270])


def test_sharded_arrays_read_through_zarr(tmp_path, volume) -> None:
    store = ImageStore(tmp_path / "sh.zarr", mode="a")
    store.add("v", volume, (1.0, 1.0, 1.0), layout=Layout(chunk_3d=16, shard_3d=32))
    assert zarr.open_array(str(tmp_path / "sh.zarr/images/v/0")).shards == (1, 32, 32, 32)
    for region in REGIONS:
        np.testing.assert_array_equal(
            ImageStore(store.path).read("v", region), volume[(slice(None), *region)]
        )
    with pytest.raises(ValueError, match="direct engine"):
        ImageStore(store.path, engine="direct").read("v", REGIONS[0])


def test_fsspec_url_store(volume) -> None:
    url = "memory://ssl_med_test/store.zarr"
    store = ImageStore(url, mode="a")
    store.add("v", volume, (1.0, 1.0, 1.0))
    again = ImageStore(url)
    assert not again.is_local and list(again) == ["v"]
    np.testing.assert_array_equal(again.read("v", REGIONS[0]), volume[(slice(None), *REGIONS[0])])


def test_version_1_stores_still_read(tmp_path, volume) -> None:
    root = zarr.open_group(str(tmp_path / "v1.zarr"), mode="w", zarr_format=3)
    arr = root.create_array("images/v", shape=volume.shape, dtype=volume.dtype, chunks=(1, 16, 16, 16))
    arr[...] = volume
    meta = {"shape": list(volume.shape), "spacing": [1.0, 1.0, 1.0], "channel_names": ["a", "b"]}
    root.attrs["ssl_med"] = {"version": 1, "images": {"v": meta}}
    np.testing.assert_array_equal(
        ImageStore(tmp_path / "v1.zarr").read("v", REGIONS[0]), volume[(slice(None), *REGIONS[0])]
    )


def test_ome_zarr_metadata(brats_store) -> None:
    group = zarr.open_group(brats_store, mode="r")
    image = group["images/BraTS20_Training_001"]
    ome = image.attrs["ome"]
    assert ome["version"] == "0.5"
    ms = ome["multiscales"][0]
    assert [a["name"] for a in ms["axes"]] == ["c", "z", "y", "x"]
    assert ms["axes"][0]["type"] == "channel" and ms["axes"][1] == {
        "name": "z",
        "type": "space",
        "unit": "millimeter",
    }
    scale = ms["datasets"][0]["coordinateTransformations"][0]
    assert ms["datasets"][0]["path"] == "0" and scale == {"type": "scale", "scale": [1.0, 1.0, 1.0, 1.0]}
    assert [c["label"] for c in ome["omero"]["channels"]] == ["t1", "t1ce", "t2", "flair"]
    assert image["0"].metadata.dimension_names == ("c", "z", "y", "x")
    assert image["labels"].attrs["ome"]["labels"] == ["seg"]
    seg = image["labels/seg"].attrs["ome"]
    assert [p["label-value"] for p in seg["image-label"]["properties"]] == [0, 1, 2, 4]
    assert image["labels/seg/0"].dtype == np.uint8
    ssl = image.attrs["ssl_med"]
    assert ssl["orientation"] == "RAS" and len(ssl["original_affine"]) == 4


def _batches(ds: RandomCropDataset, workers: int, context: str | None) -> list[torch.Tensor]:
    ctx = multiprocessing.get_context(context) if context else None
    loader = DataLoader(ds, batch_size=2, num_workers=workers, multiprocessing_context=ctx)
    return [b["image"] for b in loader]


def test_dataloader_two_workers_fork_and_spawn(tmp_path, volume) -> None:
    store = ImageStore(tmp_path / "w.zarr", mode="a")
    store.add("v", volume, (1.0, 1.0, 1.0), layout=Layout(chunk_3d=16))
    ds = RandomCropDataset(store.path, (12, 12, 12), num_channels=None, length=8, seed=5)
    expected = _batches(ds, 0, None)  # the parent reads data before forking (the dangerous order)
    assert ds._store is not None
    for context in ("fork", "spawn"):
        got = _batches(ds, 2, context)
        assert len(got) == 4 and all(torch.equal(a, b) for a, b in zip(got, expected)), context


def test_foreground_aware_sampling_and_channel_names(brats_store) -> None:
    plain = RandomCropDataset(brats_store, (48, 48, 48), num_channels=None, length=12, seed=2)
    fg = RandomCropDataset(brats_store, (48, 48, 48), num_channels=None, length=12, seed=2,
                           min_foreground=0.5, max_tries=20, return_channel_names=True)  # fmt: skip

    def fraction(x: torch.Tensor) -> float:
        return float((x.max(0).values > 0.05).float().mean())

    plain_f = [fraction(plain[i]["image"]) for i in range(12)]
    fg_f = [fraction(fg[i]["image"]) for i in range(12)]
    assert min(fg_f) >= 0.5 and sum(f < 0.5 for f in plain_f) >= 6  # half the plain crops are mostly air
    sample = fg[3]
    # one string per sample (collates to a list of B strings; ssl_med.data.channels.batch_channel_names)
    assert sample["channel_names"] == "t1|t1ce|t2|flair" and sample["image"].shape == (
        4,
        48,
        48,
        48,
    )
    assert torch.equal(fg[3]["image"], sample["image"])  # deterministic


def test_raw_handoff_normalises_to_the_worker_crops(brats_store) -> None:
    """normalise="batch": int16 crops + window through 2 spawned workers, then normalise_batch equals the
    float32 crops normalised in the workers, and foreground-aware sampling picks the same crops."""
    kw = {"num_channels": None, "length": 8, "seed": 2, "min_foreground": 0.5, "max_tries": 20}
    worker = RandomCropDataset(brats_store, (40, 40, 40), **kw)
    raw = RandomCropDataset(brats_store, (40, 40, 40), **kw, normalise="batch")
    expected = [b["image"] for b in DataLoader(worker, batch_size=4)]
    got = list(DataLoader(raw, batch_size=4, num_workers=2, multiprocessing_context="spawn"))
    assert got[0]["image"].dtype == torch.int16 and got[0]["intensity_window"].shape == (4, 4, 2)
    for batch, want in zip(got, expected, strict=True):
        out = normalise_batch(batch)
        assert "intensity_window" not in out and out["image"].dtype == torch.float32
        torch.testing.assert_close(out["image"], want, rtol=0, atol=1e-6)
    plain = {"image": expected[0]}
    assert normalise_batch(plain) is plain  # worker-normalised batches pass through


def test_raw_handoff_pads_ct_values_to_zero(tmp_path) -> None:
    """Images smaller than the crop: the padding normalises to 0 also when the window starts below 0 (CT)."""
    ct = np.random.default_rng(3).integers(-1024, 1500, size=(1, 20, 24)).astype(np.int16)
    store = ImageStore(tmp_path / "ct.zarr", mode="a")
    store.add("ct", ct, (1.0, 1.0))
    for mode in ("pad", "resize"):  # both hand-offs agree however small images are brought to size
        worker = RandomCropDataset(store.path, (32, 32), length=2, seed=1, small_images=mode)
        raw = RandomCropDataset(store.path, (32, 32), length=2, seed=1, normalise="auto", small_images=mode)
        assert raw.normalise == "batch"
        for i in range(2):
            sample = raw[i]
            batch = normalise_batch({k: v[None] for k, v in sample.items()})
            torch.testing.assert_close(batch["image"][0], worker[i]["image"], rtol=0, atol=1e-6)
            if mode == "pad":
                assert float(batch["image"][0, :, 20:].abs().max()) == 0.0


def test_raw_handoff_refuses_channel_averaging(brats_store) -> None:
    assert RandomCropDataset(brats_store, (8, 8, 8), num_channels=1, normalise="auto").normalise == "worker"
    with pytest.raises(ValueError, match="average channels"):
        RandomCropDataset(brats_store, (8, 8, 8), num_channels=1, normalise="batch")


def test_ingest_keeps_labels(brats_store, shared_data, tmp_path) -> None:
    """The store keeps what the labelled files carry: label maps beside the image, MedMNIST labels and
    splits in the manifest (the evaluators read labelled sets from the files, ``ssl_med.evaluators.datasets``)."""
    from ssl_med.data.ingest import ingest

    brats = ImageStore(brats_store)
    (name,) = [n for n, m in brats.manifest.items() if "seg" in m.label_maps]
    assert brats.read_label(name, "seg").shape == (1, 155, 240, 240)
    assert brats.read(name).shape == (4, 155, 240, 240)
    out = str(tmp_path / "b.zarr")
    ingest([str(shared_data / "medmnist" / "breastmnist.npz")], out, progress=False)
    manifest = ImageStore(out).manifest
    with np.load(shared_data / "medmnist" / "breastmnist.npz") as z:
        for split in ("train", "test"):
            metas = [m for m in manifest.values() if m.split == split]
            labels = np.asarray([m.label for m in metas], dtype=np.int64).reshape(len(metas), -1)
            np.testing.assert_array_equal(labels, z[f"{split}_labels"])
    assert not any(m.label_maps for m in manifest.values())


def test_ingest_command(inputs, tmp_path, capsys) -> None:
    from ssl_med.commands.ingest import COMMAND

    with pytest.raises(SystemExit) as exc:
        COMMAND.run(["--help"])
    assert exc.value.code == 0 and "MedMNIST" in capsys.readouterr().out
    out = str(tmp_path / "c.zarr")
    assert COMMAND.run([str(inputs["good"] / "cell.png"), str(inputs["bad"] / "empty.png"), "--out", out,
                        "--verify", "--no-progress"]) == 0  # fmt: skip
    printed = capsys.readouterr().out
    assert "1 images written" in printed and "zero-size" in printed and "1 images checked: OK" in printed
    assert (
        COMMAND.run([str(inputs["bad"] / "empty.png"), "--out", str(tmp_path / "d.zarr"), "--no-progress"])
        == 1
    )


def test_images_validate_as_ngff_0_5(brats_store) -> None:
    """Schema check with yaozarrs (an OME-Zarr model package; skipped when not installed)."""
    yaozarrs = pytest.importorskip("yaozarrs")
    yaozarrs.validate_zarr_store(f"{brats_store}/images/BraTS20_Training_001")
    for node in ("", "/labels", "/labels/seg"):
        yaozarrs.validate_ome_json(
            Path(f"{brats_store}/images/BraTS20_Training_001{node}/zarr.json").read_text()
        )
