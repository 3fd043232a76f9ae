"""MAE against a plain float64 implementation, and a short learning run on real demo crops."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from objectives.losses.hog import hog_targets
from objectives.mae import MAE, masked_patch_loss, random_masking
from ssl_med.data.crops import RandomCropDataset
from ssl_med.registry import BACKBONES


def reference_mae_loss(pred: np.ndarray, target: np.ndarray, mask: np.ndarray, norm_pix: bool) -> float:
    num, den = 0.0, 0.0
    for b in range(pred.shape[0]):
        for n in range(pred.shape[1]):
            t = target[b, n]
            if norm_pix:
                t = (t - t.mean()) / np.sqrt(t.var(ddof=1) + 1e-6)
            e = float(np.mean((pred[b, n] - t) ** 2))
            num += e * mask[b, n]
            den += mask[b, n]
    return num / den


@pytest.mark.parametrize("norm_pix", [True, False])
def test_masked_patch_loss_matches_reference(norm_pix: bool) -> None:
    rng = np.random.default_rng(0)
    pred, target = rng.normal(size=(3, 10, 12)), rng.normal(size=(3, 10, 12))
    mask = rng.random((3, 10)) < 0.7
    got = masked_patch_loss(torch.from_numpy(pred), torch.from_numpy(target), torch.from_numpy(mask), norm_pix)
    assert got.item() == pytest.approx(reference_mae_loss(pred, target, mask, norm_pix), rel=1e-10)


def test_no_masked_patch_gives_zero_not_nan() -> None:
    loss = masked_patch_loss(torch.randn(2, 4, 3), torch.randn(2, 4, 3), torch.zeros(2, 4, dtype=torch.bool), True)
    assert loss.item() == 0.0


def test_random_masking_ratio_and_order() -> None:
    noise = torch.rand(4, 100)
    keep, mask = random_masking(noise, 0.75)
    assert keep.shape == (4, 25) and mask.sum(1).tolist() == [75] * 4
    assert (keep.diff(dim=1) > 0).all()  # raster order for sequence backbones
    # the kept tokens are the 25 lowest-noise ones
    torch.testing.assert_close(keep, noise.argsort(1)[:, :25].sort(1).values)
    with pytest.raises(ValueError):
        random_masking(torch.rand(1, 3), 0.9)


def _tiny_mae(spatial_dims: int, img: int, **kwargs) -> MAE:
    torch.manual_seed(0)
    enc = BACKBONES.build("vit", spatial_dims=spatial_dims, in_chans=1, img_size=img, patch_size=8, embed_dim=48, depth=2)
    return MAE(enc, decoder_dim=32, decoder_depth=1, decoder_heads=2, **kwargs)


def test_hog_target_is_the_masked_patches_descriptor_whatever_norm_pix_loss() -> None:
    """``target="hog"``: the decoder predicts a 2 x 2-cell, 9-bin descriptor per patch, scored on the masked
    patches as given (``norm_pix_loss`` is for pixels); the preview shows no reconstruction; 3D is refused."""
    mae = _tiny_mae(2, 32, target="hog")
    assert mae.norm_pix_loss and mae.hog_cell_size == 4 and mae.decoder.pred.out_features == 4 * 9
    x, noise = torch.rand(3, 1, 32, 32), torch.rand(3, 16)
    out = mae({"image": x}, noise=noise)
    keep_idx, mask = random_masking(noise, mae.mask_ratio)
    with torch.no_grad():
        pred, _ = mae._encode_decode(x, {"image": x}, keep_idx, mask, (4, 4))
    expected = masked_patch_loss(pred, hog_targets(x, (8, 8), 4), mask, norm_pix=False)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert set(mae.preview({"image": x})) == {"input", "masked"}
    with pytest.raises(ValueError, match=r"objective\.target=hog.*2D only"):
        _tiny_mae(3, 32, target="hog")
    with pytest.raises(ValueError, match=r"objective\.target=hog.*must divide"):
        _tiny_mae(2, 32, target="hog", hog_cell_size=3)
    with pytest.raises(ValueError, match=r"objective\.target=.sift."):
        _tiny_mae(2, 32, target="sift")


def test_mae_with_a_resized_crop_asks_for_normalised_crops() -> None:
    """The resized crop interpolates, so the data module must hand it ``[0, 1]`` crops."""
    enc = _tiny_mae(2, 32).encoder
    assert MAE(enc, decoder_dim=32, decoder_depth=1, decoder_heads=2).geometric_views
    assert not MAE(enc, decoder_dim=32, decoder_depth=1, decoder_heads=2, crop_scale=(0.2, 1.0)).geometric_views
    with pytest.raises(ValueError, match="crop_scale"):
        MAE(enc, decoder_dim=32, decoder_depth=1, decoder_heads=2, crop_scale=(0.0, 1.0))


def test_fixed_noise_is_deterministic() -> None:
    mae = _tiny_mae(2, 32).eval()
    x = torch.rand(2, 1, 32, 32)
    noise = torch.rand(2, 16)
    assert mae({"image": x}, noise=noise).loss == mae({"image": x}, noise=noise).loss


def test_preview_shapes() -> None:
    mae = _tiny_mae(3, 16)
    images = mae.preview({"image": torch.rand(2, 1, 16, 16, 16)})
    assert set(images) == {"input", "masked", "reconstruction"}
    assert all(v.shape == (2, 1, 16, 16, 16) for v in images.values())


@pytest.mark.parametrize(("encoder_input", "target"), [("visible", "pixels"), ("mask_tokens", "pixels"), ("visible", "hog")])
def test_mae_learns_on_demo_crops(demo_store_2d: str, fit_objective, encoder_input: str, target: str) -> None:
    mae = _tiny_mae(2, 32, target=target)
    mae.encoder_input = encoder_input
    ds = RandomCropDataset(demo_store_2d, (32, 32), length=512, transform=mae.view_transform())
    loader = DataLoader(ds, batch_size=32)
    opt = torch.optim.AdamW(mae.parameters(), lr=2e-3)
    fixed = next(iter(loader))
    noise = torch.rand(32, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before = mae(fixed, noise=noise).loss.item()
    fit_objective(mae, itertools.chain(loader, loader), 2 * len(loader), opt)
    with torch.no_grad():
        out = mae(fixed, noise=noise)
    assert out.loss.item() < 0.8 * before
    z = torch.nn.functional.normalize(out.embeddings, dim=1)
    assert z.std(dim=0).mean() > 0.01  # not collapsed


def test_mae_adds_the_uniformity_term_it_is_given() -> None:
    """``uniformity_weight`` adds U-MAE's term on the mean visible token to the reconstruction loss."""
    plain, uniform = _tiny_mae(2, 32), _tiny_mae(2, 32)
    uniform.uniformity_weight = 0.5
    x, noise = torch.rand(4, 1, 32, 32), torch.rand(4, 16)
    base, out = plain({"image": x}, noise=noise), uniform({"image": x}, noise=noise)
    assert set(base.terms) == {"mae"} and set(out.terms) == {"mae", "uniformity"}
    assert out.terms["mae"] == base.terms["mae"]
    assert out.loss.item() == pytest.approx(base.loss.item() + 0.5 * out.terms["uniformity"].item())
    with pytest.raises(ValueError, match="uniformity_weight"):
        MAE(plain.encoder, decoder_dim=32, decoder_depth=1, decoder_heads=2, uniformity_weight=-1.0)


@pytest.mark.parametrize("backbone", ["vit", "mamba"])
def test_mask_token_input_reads_every_position_but_never_a_masked_pixel(backbone: str) -> None:
    """``encoder_input=mask_tokens``: the encoder reads all N positions (its mask token where masked), so
    a visible pixel changes the prediction of the other patches, while no masked pixel reaches the loss's
    predictions; the encoder's mask token is trained, the decoder's is not used; its embedding is the mean
    of the visible tokens as encoded in the full sequence."""
    torch.manual_seed(0)
    kwargs = {"img_size": 16, "patch_size": 4, "spatial_dims": 2, "in_chans": 1, "depth": 2}
    encoder = BACKBONES.get(backbone)(embed_dim=32, **kwargs, **({"num_heads": 2} if backbone == "vit" else {}))
    with torch.no_grad():
        encoder.mask_token.normal_()
    mae = MAE(encoder, decoder_dim=32, decoder_depth=1, decoder_heads=2, encoder_input="mask_tokens").eval()
    x, noise = torch.rand(2, 1, 16, 16), torch.rand(2, 16)
    keep_idx, mask = random_masking(noise, mae.mask_ratio)
    calls = []
    hook = encoder.register_forward_hook(lambda m, a, kw, out: calls.append((kw, out)), with_kwargs=True)
    out = mae({"image": x}, noise=noise)
    hook.remove()
    (kw, encoded), = calls
    assert kw.get("keep_idx") is None and torch.equal(kw["mask"], mask) and encoded.patch_tokens.shape[1] == 16
    visible = torch.stack([encoded.patch_tokens[b, keep_idx[b]] for b in range(2)])
    torch.testing.assert_close(out.embeddings, visible.mean(dim=1))
    # masked pixels: replace them and the predictions do not move
    pixels_of = torch.nn.functional.interpolate(mask.view(2, 1, 4, 4).float(), scale_factor=4) > 0
    pred = mae._encode_decode(x, {"image": x}, keep_idx, mask, (4, 4))[0]
    scrambled = torch.where(pixels_of, torch.rand_like(x), x)
    torch.testing.assert_close(mae._encode_decode(scrambled, {"image": scrambled}, keep_idx, mask, (4, 4))[0], pred)
    moved = torch.where(pixels_of, x, torch.rand_like(x))
    assert not torch.allclose(mae._encode_decode(moved, {"image": moved}, keep_idx, mask, (4, 4))[0], pred)
    mae.train()
    mae({"image": x}, noise=noise).loss.backward()
    assert encoder.mask_token.grad is not None and encoder.mask_token.grad.abs().sum() > 0
    grad = mae.decoder.mask_token.grad  # every position is overwritten by an encoded token
    assert grad is None or not grad.any()
    with pytest.raises(ValueError, match="encoder_input"):
        MAE(encoder, decoder_dim=32, decoder_depth=1, decoder_heads=2, encoder_input="masked")

