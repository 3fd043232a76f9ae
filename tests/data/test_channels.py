"""Channel identity end to end (store -> crop -> batch -> encoder) and modality dropout (issue #19)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ssl_med.data import channels as channels_module
from ssl_med.data.channels import (
    GRAY,
    batch_channel_names,
    channel_names_for,
    draw_channel_keep,
    encode_names,
    encoder_channel_kwargs,
)
from ssl_med.data.crops import RandomCropDataset
from ssl_med.data.intensity import normalise_batch
from ssl_med.data.store import ImageStore
from ssl_med.registry import BACKBONES

SEQUENCES = ("t1", "t1ce", "t2", "flair")


@pytest.fixture()
def named_store(tmp_path) -> str:
    """Two 4-sequence volumes (BraTS order) and one with other names, distinct values per channel."""
    rng = np.random.default_rng(0)
    store = ImageStore(tmp_path / "s.zarr", mode="a")
    for k, names in enumerate([SEQUENCES, ("FLAIR", "T2", "T1CE", "T1"), ("ch0", "ch1", "ch2", "ch3")]):
        vol = (rng.random((4, 12, 16, 16)) * 100 + 1000 * np.arange(1, 5)[:, None, None, None]).astype(np.int16)
        store.add(f"case{k}", vol, (1.0, 1.0, 1.0), modality="MR", channel_names=names)
    return str(store.path)


def chada(**kw):
    return BACKBONES.build(
        "chada_vit", spatial_dims=3, img_size=8, patch_size=4, embed_dim=24, depth=1, num_heads=2,
        channel_vocab=list(SEQUENCES), **kw,
    )


def test_names_survive_store_crop_batch_encoder(named_store: str) -> None:
    ds = RandomCropDataset(named_store, (8, 8, 8), num_channels=None, length=12, return_channel_names=True)
    assert {ds[i]["channel_names"] for i in range(12)} == {
        "t1|t1ce|t2|flair", "FLAIR|T2|T1CE|T1", "ch0|ch1|ch2|ch3"
    }
    batch = next(iter(DataLoader(ds, batch_size=12)))  # torch's default collate
    names = batch_channel_names(batch)
    assert len(names) == 12 and all(len(n) == 4 for n in names)
    enc = chada()
    kwargs = encoder_channel_kwargs(enc, batch)
    seen = kwargs["channel_names"]
    for given, passed in zip(names, seen):
        assert passed == (None if given[0] == "ch0" else given)  # store placeholders: per-slot embeddings
    # the encoder uses them: a case in reversed order with reversed names encodes like the BraTS order
    enc.eval()
    x = batch["image"]
    ref = next(i for i, n in enumerate(names) if n[0] == "t1")
    flipped = enc(x[ref : ref + 1].flip(1), channel_names=[list(reversed(names[ref]))]).pooled
    assert torch.allclose(enc(x[ref : ref + 1], channel_names=[names[ref]]).pooled, flipped, atol=1e-5)
    out = enc(x, **kwargs)
    assert out.pooled.shape == (12, 24)


def test_fixed_channel_encoders_get_nothing(named_store: str) -> None:
    ds = RandomCropDataset(named_store, (8, 8, 8), num_channels=4, length=4, return_channel_names=True, channel_dropout=0.5)
    batch = next(iter(DataLoader(ds, batch_size=4)))
    vit = BACKBONES.build("vit", spatial_dims=3, in_chans=4, img_size=8, patch_size=4, embed_dim=24, depth=1, num_heads=2)
    assert encoder_channel_kwargs(vit, batch) == {}
    assert vit(batch["image"], **encoder_channel_kwargs(vit, batch)).pooled.shape == (4, 24)


def test_averaged_channels_carry_no_names(named_store: str) -> None:
    ds = RandomCropDataset(named_store, (8, 8, 8), num_channels=1, length=3, return_channel_names=True)
    assert all(ds[i]["channel_names"] == "" for i in range(3))
    assert encoder_channel_kwargs(chada(), next(iter(DataLoader(ds, batch_size=3)))) == {}


def test_unknown_names_are_warned_once_but_a_grey_image_is_not(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A MedMNIST / PNG / DICOM image's lone ``gray`` channel takes the per-slot embedding quietly; a
    real name the vocabulary lacks (a microscopy stain) is reported, once."""
    monkeypatch.setattr(channels_module, "_warned", set())
    enc = chada()
    with caplog.at_level("WARNING", logger=channels_module.__name__):
        assert channel_names_for(enc, [[GRAY], [GRAY]], 2) is None
        assert not caplog.records
        assert channel_names_for(enc, [["dapi"], ["flair"]], 2) == [None, ["flair"]]
        assert channel_names_for(enc, [["dapi"]], 1) is None
    assert len(caplog.records) == 1 and "dapi" in caplog.text and "backbone.channel_vocab" in caplog.text


def test_aliases_and_case_map_to_the_same_embedding() -> None:
    enc = chada()
    assert all(enc.knows_channel(n) for n in ("FLAIR", "t2f", "T2-FLAIR", "t1c", "T1Gd", "t1n", "t2w"))
    assert enc.channel_row("t2f") == enc.channel_row("flair") == 3 and not enc.knows_channel("dwi")
    x = torch.rand(1, 2, 8, 8, 8)
    enc.eval()
    assert torch.allclose(enc(x, channel_names=[["FLAIR", "t1gd"]]).pooled, enc(x, channel_names=[["flair", "t1ce"]]).pooled)


@pytest.mark.parametrize("p", [0.3, 0.9, 0.99])
def test_dropout_never_drops_every_channel(p: float) -> None:
    rng = np.random.default_rng(0)
    keeps = np.stack([draw_channel_keep(rng, 4, p) for _ in range(2000)])
    assert keeps.any(axis=1).all()
    expected = p - p**4 / 4  # each channel goes with p, minus the one kept back when all four would go
    assert abs((~keeps).mean() - expected) < 0.03
    assert len({tuple(k) for k in keeps}) >= 4  # random subsets, not a fixed pattern
    assert (keeps.sum(axis=0) > 0).all()  # the one kept back is any channel


def test_dropout_in_crops_zero_fills_and_masks(named_store: str) -> None:
    for normalise in ("worker", "batch"):
        ds = RandomCropDataset(
            named_store, (8, 8, 8), num_channels=None, length=40, channel_dropout=0.5, normalise=normalise, seed=3
        )
        batch = normalise_batch(next(iter(DataLoader(ds, batch_size=40))))
        mask = batch["channel_mask"]
        assert mask.shape == (40, 4) and mask.dtype == torch.bool
        assert mask.any(dim=1).all() and not mask.all()
        image = batch["image"]
        assert (image[~mask] == 0).all(), normalise  # dropped: zero after normalisation
        assert (image[mask].flatten(1).amax(dim=1) > 0).all()  # kept channels keep their content
        again = ds[5]
        assert torch.equal(again["channel_mask"], mask[5])  # a function of (seed, index)


def test_channel_adaptive_encoder_leaves_dropped_channels_out(named_store: str) -> None:
    ds = RandomCropDataset(named_store, (8, 8, 8), num_channels=None, length=8, channel_dropout=0.5,
                           return_channel_names=True, seed=1)
    batch = next(iter(DataLoader(ds, batch_size=8)))
    enc = chada().eval()
    kwargs = encoder_channel_kwargs(enc, batch)
    assert torch.equal(kwargs["channel_padding_mask"], ~batch["channel_mask"])
    assert encoder_channel_kwargs(enc, batch, repeat=2)["channel_padding_mask"].shape == (16, 4)
    b = int(torch.nonzero(~batch["channel_mask"].all(dim=1))[0])  # an image with a dropped channel
    keep = batch["channel_mask"][b]
    names = batch_channel_names(batch)[b]
    whole = enc(batch["image"][b : b + 1], channel_names=[[n if k else None for n, k in zip(names, keep)]])
    alone = enc(batch["image"][b : b + 1, keep], channel_names=[[n for n, k in zip(names, keep) if k]])
    assert torch.allclose(whole.pooled, alone.pooled, atol=1e-5)
    assert encode_names(["a|b", "c"]) == "a/b|c"


@pytest.fixture()
def incomplete_store(tmp_path) -> str:
    """Cases with incomplete protocols: one without T1ce (3 channels), one in another order, one
    with only a DWI (none of the wanted sequences)."""
    store = ImageStore(tmp_path / "inc.zarr", mode="a")
    base = 1000 * np.arange(1, 5)[:, None, None, None] + np.zeros((4, 12, 16, 16))
    store.add("no_t1ce", base[[0, 2, 3]].astype(np.int16), (1.0,) * 3, channel_names=("t1", "t2", "flair"))
    store.add("shuffled", base[[3, 1, 0, 2]].astype(np.int16) + 1, (1.0,) * 3, channel_names=("FLAIR", "T1ce", "t1", "t2"))
    store.add("dwi_only", base[:1].astype(np.int16), (1.0,) * 3, channel_names=("dwi",))
    return str(store.path)


@pytest.mark.parametrize("normalise", ["worker", "batch"])
def test_cases_missing_sequences_are_aligned_by_name(incomplete_store: str, normalise: str) -> None:
    ds = RandomCropDataset(incomplete_store, (8, 8, 8), num_channels=None, length=30, channels=list(SEQUENCES),
                           return_channel_names=True, normalise=normalise)  # fmt: skip
    assert sorted(ds.names) == ["no_t1ce", "shuffled"]  # dwi_only has none of them: left out
    raw = next(iter(DataLoader(ds, batch_size=30)))
    if normalise == "batch":  # stored values, in the wanted order whatever the case's own order
        means = raw["image"].float().mean(dim=(2, 3, 4))
        present = raw["channel_available"]
        expected = torch.tensor([1000.0, 2000.0, 3000.0, 4000.0]).expand_as(means)
        assert ((means - expected).abs() <= 1)[present].all() and (means[~present] == 0).all()
    batch = normalise_batch(raw)
    assert batch["image"].shape == (30, 4, 8, 8, 8)
    assert set(batch["channel_names"]) == {"t1|t1ce|t2|flair"}
    available = batch["channel_available"]
    assert torch.equal(batch["channel_mask"], available)
    lacking = ~available[:, 1]
    assert lacking.any() and (~lacking).any() and available[:, [0, 2, 3]].all()
    assert (batch["image"][lacking, 1] == 0).all()
    with pytest.raises(ValueError, match="num_channels"):
        RandomCropDataset(incomplete_store, (8, 8, 8), num_channels=1, channels=list(SEQUENCES))


def test_dropout_keeps_only_sequences_a_case_has(incomplete_store: str) -> None:
    ds = RandomCropDataset(incomplete_store, (8, 8, 8), num_channels=4, length=60, channels=list(SEQUENCES),
                           channel_dropout=0.7)  # fmt: skip
    batch = next(iter(DataLoader(ds, batch_size=60)))
    keep, available = batch["channel_mask"], batch["channel_available"]
    assert (keep <= available).all() and keep.any(dim=1).all() and (keep != available).any()
    rng = np.random.default_rng(0)
    avail = np.array([True, False, False, True])
    for _ in range(500):
        k = draw_channel_keep(rng, 4, 0.95, avail)
        assert k.any() and not (k & ~avail).any()
