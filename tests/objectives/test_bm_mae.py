"""objective=bm_mae: loss against an independent computation, learning on the real BraTS case (2D and
3D, with modality dropout), synthesis of a held-out sequence, and a pretraining run whose export
carries the channel vocabulary and is used on a subset of sequences."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from torch.utils.data import DataLoader

import ssl_med
from objectives.bm_mae import BMMAE
from objectives.bm_mae_synthesis import synthesis_figure, synthesis_scores
from ssl_med.data.crops import RandomCropDataset
from ssl_med.registry import BACKBONES, OBJECTIVES

SEQUENCES = ["t1", "t1ce", "t2", "flair"]


@pytest.fixture(scope="module")
def brats_store(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    from ssl_med.data.ingest import ingest

    out = tmp_path_factory.mktemp("brats") / "brats.zarr"
    assert ingest([str(shared_data / "brats2020_sample")], str(out), progress=False).written == 1
    return str(out)


def tiny(spatial_dims: int, size: int, patch: int) -> BMMAE:
    encoder = BACKBONES.build(
        "chada_vit", spatial_dims=spatial_dims, img_size=size, patch_size=patch, embed_dim=48, depth=2,
        num_heads=3, channel_vocab=SEQUENCES,
    )
    return OBJECTIVES.build("bm_mae", encoder=encoder, in_chans=4, decoder_dim=32, decoder_depth=1, decoder_heads=2)


def test_loss_is_the_sum_of_per_modality_masked_mse() -> None:
    torch.manual_seed(0)
    obj = tiny(2, 16, 4)
    batch = {"image": torch.rand(3, 4, 16, 16), "channel_names": ["t1|t1ce|t2|flair"] * 3,
             "channel_mask": torch.tensor([[1, 1, 1, 1], [1, 0, 1, 1], [0, 0, 1, 1]], dtype=torch.bool)}
    grid = (4, 4)
    torch.manual_seed(1)
    keep, mask = obj.draw_masks(batch["channel_mask"], grid)
    torch.manual_seed(1)
    out = obj(batch)
    pred, _ = obj.predict(batch, keep, grid)
    # independent: patches of each modality by unfold, squared error per patch, mean over masked
    target = batch["image"].unfold(2, 4, 4).unfold(3, 4, 4).reshape(3, 4, 16, 16)  # (B, M, N, 16)
    total = 0.0
    for m in range(4):
        err = ((pred[:, m] - target[:, m]) ** 2).mean(-1)
        term = ((err * mask[:, m]).sum() / mask[:, m].sum()).detach()
        assert out.terms[f"recon_{SEQUENCES[m]}"] == pytest.approx(float(term), rel=1e-5)
        total += term
    assert float(out.loss) == pytest.approx(float(total), rel=1e-5)
    # the dropped modalities are never visible, and are reconstruction targets (all their patches masked)
    n = 16
    assert mask[1, 1].all() and mask[2, :2].all()
    assert (keep[2] // n >= 2).all()
    assert keep.shape[1] == int(2 * n * 0.25)  # budget of the image with the fewest modalities


def test_sequences_a_case_lacks_are_not_scored() -> None:
    """``channel_available`` False (missing from the store, data.channels): never visible, not a target."""
    torch.manual_seed(0)
    obj = tiny(2, 16, 4)
    available = torch.tensor([[1, 0, 1, 1], [1, 0, 1, 0]], dtype=torch.bool)
    batch = {"image": torch.rand(2, 4, 16, 16), "channel_mask": available, "channel_available": available}
    out = obj(batch)
    assert float(out.terms["recon_c1"]) == 0.0 and float(out.terms["recon_c3"]) > 0.0
    assert float(out.loss) == pytest.approx(sum(float(out.terms[f"recon_c{i}"]) for i in range(4)), rel=1e-5)


def test_pairs_only_with_tokens_per_channel() -> None:
    """ChAda-ViT and the ViT with per-modality tokens pair; a fused ViT is refused naming the option."""
    vit = BACKBONES.build("vit", spatial_dims=2, in_chans=4, img_size=16, patch_size=4, embed_dim=48, depth=1, num_heads=3)
    with pytest.raises(ValueError, match="channel_tokens=per_modality"):
        OBJECTIVES.build("bm_mae", encoder=vit, in_chans=4)
    assert BMMAE.pairing_problem("chada_vit") is None and BMMAE.pairing_problem("vit") is None
    assert BMMAE.pairing_problem("mamba") and BMMAE.pairing_problem("xlstm")


@pytest.mark.parametrize(("spatial_dims", "size", "patch"), [(2, 32, 8), (3, 32, 8)])
def test_learns_on_the_brats_case(brats_store: str, spatial_dims: int, size: int, patch: int) -> None:
    """A few steps on crops of the real 4-sequence case (modality dropout on): the loss on a fixed
    batch with fixed masks falls, for every modality."""
    torch.manual_seed(0)
    obj = tiny(spatial_dims, size, patch)
    ds = RandomCropDataset(
        brats_store, (size,) * spatial_dims, num_channels=None, length=64, seed=1, min_foreground=0.3,
        return_channel_names=True, channel_dropout=0.25, transform=obj.view_transform(),
    )
    batches = list(DataLoader(ds, batch_size=8))
    assert batches[0]["image"].shape == (8, 4, *(size,) * spatial_dims)
    assert batches[0]["channel_names"][0] == "t1|t1ce|t2|flair"
    dropped = ~batches[0]["channel_mask"]
    assert dropped.any() and (batches[0]["image"][dropped].flatten(1).amax(1) > 0).any(), "ground truth kept"
    fixed = batches[0]

    def fixed_loss() -> dict[str, float]:
        torch.manual_seed(123)
        with torch.no_grad():
            return {k: float(v) for k, v in obj(fixed).terms.items()}

    before = fixed_loss()
    psnr_before = synthesis_scores(obj, fixed, "flair")[0]["psnr"]
    obj.train()
    opt = torch.optim.AdamW(obj.parameters(), lr=2e-3)
    for step in range(30):
        out = obj(batches[step % len(batches)])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    after = fixed_loss()
    assert after["bm_mae"] < 0.7 * before["bm_mae"], (before, after)
    assert all(after[f"recon_{s}"] < before[f"recon_{s}"] for s in SEQUENCES), (before, after)
    # FLAIR synthesised from T1, T1ce and T2 alone improves too
    assert synthesis_scores(obj, fixed, "flair")[0]["psnr"] > psnr_before + 1.0


def test_reconstructs_a_held_out_sequence() -> None:
    torch.manual_seed(0)
    obj = tiny(3, 16, 8).eval()
    x = torch.rand(2, 4, 16, 16, 16)
    available = torch.tensor([[1, 1, 1, 0]] * 2, dtype=torch.bool)
    batch = {"image": x, "channel_names": ["t1|t1ce|t2|flair"] * 2}
    out = obj.reconstruct(batch, available)
    assert out.shape == x.shape
    x2 = x.clone()
    x2[:, 3] = torch.rand(2, 16, 16, 16)  # the held-out sequence's content is never read
    torch.testing.assert_close(obj.reconstruct({**batch, "image": x2}, available), out)
    preview = obj.preview(batch)
    assert set(preview) == {"input", "masked", "reconstruction"} and preview["reconstruction"].shape == x.shape


def test_synthesis_scores_and_figure(tmp_path: Path) -> None:
    torch.manual_seed(0)
    obj = tiny(2, 16, 4)
    batch = {"image": torch.rand(2, 4, 16, 16), "channel_names": ["t1|t1ce|t2|flair"] * 2}
    scores, synth = synthesis_scores(obj, batch, "FLAIR")
    mse = ((synth - batch["image"][:, 3:4]) ** 2).flatten(1).mean(dim=1)
    assert scores["psnr"] == pytest.approx(float((10 * torch.log10(1 / mse)).mean()), rel=1e-4)
    assert -1.0 <= scores["ssim"] <= 1.0 and synth.shape == (2, 1, 16, 16)
    assert synthesis_scores(obj, batch, 3)[0] == scores
    path = synthesis_figure(batch["image"], synth, SEQUENCES, 3, tmp_path / "synth.png", "flair from t1, t1ce, t2")
    assert path.stat().st_size > 1000
    with pytest.raises(ValueError, match="not one of"):
        synthesis_scores(obj, batch, "dwi")


def test_pretrain_exports_the_vocabulary_and_runs_on_a_subset(brats_store: str, tmp_path: Path) -> None:
    """``ssl_med pretrain backbone=chada_vit objective=bm_mae data=store ... data.spatial_dims=3`` runs;
    the exported encoder's config carries the channel vocabulary; FLAIR + T1 alone work by name."""
    from ssl_med.config import parse_pretrain_config
    from ssl_med.train import run as run_module

    overrides = [
        "backbone=chada_vit", "objective=bm_mae", "data=store", f"data.store={brats_store}", "data.spatial_dims=3",
        "data.num_channels=4", "data.crop_size=[32,32,32]", "data.patch_size=8", "data.channel_dropout=0.25",
        "data.batch_size=2", "data.num_workers=0", "data.samples_per_epoch=8", "backbone.embed_dim=48",
        "backbone.depth=1", "objective.decoder_dim=32", "objective.decoder_depth=1", "objective.decoder_heads=2",
        "trainer.max_steps=3", "trainer.progress_bar=false", "online_eval.data=null",
    ]
    with initialize_config_module(config_module="ssl_med.conf", version_base="1.3"):
        cfg = parse_pretrain_config(compose(config_name="pretrain", overrides=overrides))
    export_dir = run_module.pretrain(cfg, tmp_path)
    encoder = ssl_med.load_pretrained(export_dir).eval()
    assert [*encoder.channel_vocab] == SEQUENCES
    x = torch.rand(1, 2, 32, 32, 32)
    out = encoder(x, channel_names=[["FLAIR", "T1"]])
    assert out.pooled.shape == (1, 48) and out.patch_tokens.shape == (1, 64, 48)
    swapped = encoder(x.flip(1), channel_names=[["T1", "FLAIR"]])
    torch.testing.assert_close(out.pooled, swapped.pooled, atol=1e-5, rtol=1e-5)
