"""``ssl_med ingest --channel-names``: user-given names for multi-channel inputs whose files name none
(issue #19), through the command line, into the store and on to crops, ``data.channels`` alignment,
batches and ChAda-ViT's channel embedding; the mismatch error before any work; names from files win."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ssl_med.cli import main
from ssl_med.data.channels import batch_channel_names, encoder_channel_kwargs
from ssl_med.data.crops import RandomCropDataset
from ssl_med.data.ingest_channels import ChannelNamesError, parse_channel_names
from ssl_med.data.store import ImageStore
from ssl_med.registry import BACKBONES

NAMES = "T1,T1ce,T2,FLAIR"


def write_nifti(path: Path, channels: int, seed: int = 0) -> np.ndarray:
    """A tiny ``(12, 12, 12, C)`` NIfTI (identity affine) whose channel ``c`` lies around ``1000 (c + 1)``;
    returns the data as ``(C, 12, 12, 12)``."""
    import nibabel as nib

    rng = np.random.default_rng(seed)
    data = (rng.random((12, 12, 12, channels)) * 100 + 1000 * np.arange(1, channels + 1)).astype(np.int16)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data if channels > 1 else data[..., 0], np.eye(4)), str(path))
    return np.moveaxis(data, 3, 0)


def ingest(*args: str) -> int:
    return main(["ingest", *args, "--orientation", "", "--no-progress"])


def test_names_reach_the_store_crops_batches_and_the_encoder(tmp_path: Path) -> None:
    data = write_nifti(tmp_path / "in" / "case1.nii.gz", 4)
    store = tmp_path / "s.zarr"
    assert ingest(str(tmp_path / "in"), "--out", str(store), "--channel-names", NAMES) == 0
    assert ImageStore(store).manifest["case1"].channel_names == ("T1", "T1ce", "T2", "FLAIR")
    stored = ImageStore(store).read("case1")  # storage order (C, Z, Y, X); channel order kept
    np.testing.assert_array_equal(np.sort(stored.reshape(4, -1), axis=1), np.sort(data.reshape(4, -1), axis=1))

    # crops carry the names, data.channels selects by them (case-insensitively), ChAda-ViT embeds by them
    ds = RandomCropDataset(str(store), (8, 8, 8), num_channels=None, length=4, channels=["flair", "t1"],
                           return_channel_names=True, normalise="batch")  # fmt: skip
    assert ds.names == ["case1"]
    batch = next(iter(DataLoader(ds, batch_size=4)))
    means = batch["image"].float().mean(dim=(2, 3, 4))
    assert ((means[:, 0] > 4000) & (means[:, 0] < 4100) & (means[:, 1] > 1000) & (means[:, 1] < 1100)).all()
    assert batch_channel_names(batch) == [["flair", "t1"]] * 4
    ds = RandomCropDataset(str(store), (8, 8, 8), num_channels=None, length=2, return_channel_names=True)
    batch = next(iter(DataLoader(ds, batch_size=2)))
    assert batch["channel_names"] == ["T1|T1ce|T2|FLAIR"] * 2
    encoder = BACKBONES.build("chada_vit", spatial_dims=3, img_size=8, patch_size=4, embed_dim=24, depth=1,
                              num_heads=2, channel_vocab=["t1", "t1ce", "t2", "flair"]).eval()  # fmt: skip
    kwargs = encoder_channel_kwargs(encoder, batch)
    assert kwargs["channel_names"] == [["T1", "T1ce", "T2", "FLAIR"]] * 2
    out = encoder(batch["image"], **kwargs)
    flipped = encoder(batch["image"].flip(1), channel_names=[["FLAIR", "T2", "T1ce", "T1"]] * 2)
    torch.testing.assert_close(out.pooled, flipped.pooled, atol=1e-5, rtol=1e-5)  # embedded by name, not slot


def test_a_channel_count_mismatch_fails_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_nifti(tmp_path / "in" / "a_four.nii.gz", 4)
    write_nifti(tmp_path / "in" / "b_three.nii.gz", 3)
    np.save(tmp_path / "in" / "c_two.npy", np.zeros((2, 4, 8, 8), dtype=np.float32))
    store = tmp_path / "s.zarr"
    assert ingest(str(tmp_path / "in"), "--out", str(store), "--channel-names", NAMES) == 2
    err = capsys.readouterr().err
    assert "b_three.nii.gz: 3 channels" in err and "c_two.npy: 2 channels" in err and "a_four" not in err
    assert "4 names" in err and not store.exists()  # nothing was written, not even the store


def test_names_found_in_files_win(tmp_path: Path) -> None:
    """A BraTS-style case folder (suffix names, 2 sequences) and an RGB TIFF with 4 given names: no
    error, their names kept; a 4-channel NIfTI and a 4-channel TIFF get the given names."""
    for suffix in ("t1", "flair"):
        write_nifti(tmp_path / "in" / "BraTS_001" / f"BraTS_001_{suffix}.nii.gz", 1)
    write_nifti(tmp_path / "in" / "multi.nii.gz", 4)
    write_nifti(tmp_path / "in" / "single.nii.gz", 1, seed=1)  # single-channel: keeps its own (placeholder) name
    import tifffile

    rng = np.random.default_rng(0)
    tifffile.imwrite(tmp_path / "in" / "stains.tif", rng.integers(0, 255, (4, 8, 8), dtype=np.uint8), metadata={"axes": "CYX"})
    tifffile.imwrite(tmp_path / "in" / "photo.tif", rng.integers(0, 255, (8, 8, 3), dtype=np.uint8), photometric="rgb")
    store = tmp_path / "s.zarr"
    assert ingest(str(tmp_path / "in"), "--out", str(store), "--channel-names", NAMES) == 0
    manifest = ImageStore(store).manifest
    assert manifest["BraTS_001"].channel_names == ("t1", "flair")
    assert manifest["multi"].channel_names == ("T1", "T1ce", "T2", "FLAIR")
    assert manifest["single"].channel_names == ("ch0",)
    assert manifest["stains"].channel_names == ("T1", "T1ce", "T2", "FLAIR")  # a TIFF's C axis: unnamed
    assert manifest["photo"].channel_names == ("R", "G", "B")  # RGB: named by its file


def test_malformed_names_are_refused(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert parse_channel_names(" T1, t2 ") == ("T1", "t2")
    for bad, reason in [("T1,t1", "distinct"), ("T1,,T2", "non-empty"), ("ch0,ch1", "unnamed"), ("a|b,c", "contain")]:
        with pytest.raises(ChannelNamesError, match=reason):
            parse_channel_names(bad)
        with pytest.raises(SystemExit):
            ingest(str(tmp_path), "--out", str(tmp_path / "s.zarr"), "--channel-names", bad)
    assert "--channel-names" in capsys.readouterr().err


def test_help_explains_the_flag(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit):
        main(["ingest", "--help"])
    text = capsys.readouterr().out
    assert "--channel-names" in text and "names found in files win" in text.lower()


def test_repair_keeps_the_given_names(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """``--verify --repair`` re-reads a damaged image from its file, which names no channels: the names
    given at ingest stay in the manifest."""
    write_nifti(tmp_path / "in" / "case1.nii.gz", 4)
    store = tmp_path / "s.zarr"
    assert ingest(str(tmp_path / "in"), "--out", str(store), "--channel-names", NAMES, "--chunk", "8") == 0
    before = ImageStore(store).read("case1")
    chunks = sorted(p for p in (store / "images" / "case1" / "0").rglob("*") if p.is_file() and p.name != "zarr.json")
    chunks[0].unlink()
    assert main(["ingest", "--verify", "--repair", "--out", str(store)]) == 0
    assert "1 images repaired" in capsys.readouterr().out
    assert ImageStore(store).manifest["case1"].channel_names == ("T1", "T1ce", "T2", "FLAIR")
    np.testing.assert_array_equal(ImageStore(store).read("case1"), before)
