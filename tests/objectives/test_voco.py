"""VoCo: overlap geometry by hand, every loss term against plain loops (float64), EMA, and a short
learning run on real 3D demo crops."""

from __future__ import annotations

import copy
import itertools

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, default_collate

from objectives.voco import (
    VoCo,
    VoCoViews,
    base_regularisation,
    crop_channel_kwargs,
    negative_loss,
    online_assign,
    overlap_labels,
    position_loss,
)
from ssl_med.data.crops import RandomCropDataset
from ssl_med.registry import BACKBONES


# -- geometry ------------------------------------------------------------------------------------
def test_overlap_labels_hand_computed() -> None:
    # 12x12 region, 3x3 grid of 4x4 cells, 4x4 random crops
    origins = torch.tensor([[0, 0], [2, 2], [8, 8], [0, 6], [5, 1], [8, 0]])
    got = overlap_labels(origins, (4, 4), (3, 3), (4, 4))
    want = torch.zeros(6, 9, dtype=torch.float64)
    want[0, 0] = 1.0  # exactly on cell 0
    want[1, [0, 1, 3, 4]] = 0.25  # centred on the corner of 4 cells
    want[2, 8] = 1.0  # touching the bottom-right border
    want[3, [1, 2]] = 0.5  # top border, straddling two cells
    want[4, 3], want[4, 4], want[4, 6], want[4, 7] = 9 / 16, 3 / 16, 3 / 16, 1 / 16  # rows 5..9, cols 1..5
    want[5, 6] = 1.0  # bottom-left border
    torch.testing.assert_close(got, want)
    assert (got[4, [0, 1, 2, 5, 8]] == 0).all()  # zero-overlap cells are exactly zero
    torch.testing.assert_close(got.sum(1), torch.ones(6, dtype=torch.float64))


def test_overlap_labels_rectangular_cells() -> None:
    # 2x3 grid of 5x4 cells; crop at (3, 6): rows 3..8, cols 6..10
    got = overlap_labels(torch.tensor([[3, 6]]), (5, 4), (2, 3), (5, 4))[0]
    want = torch.zeros(6, dtype=torch.float64)
    want[1], want[2] = 2 * 2 / 20, 2 * 2 / 20  # row 0 (0..5): 2 rows; cols 4..8: 2, 8..12: 2
    want[4], want[5] = 3 * 2 / 20, 3 * 2 / 20  # row 1 (5..10): 3 rows
    torch.testing.assert_close(got, want)


@pytest.mark.parametrize("spatial", [(8, 24, 24), (24, 24)])
def test_views_cut_bases_and_crops_from_the_region(spatial: tuple[int, ...]) -> None:
    views = VoCoViews(grid=(3, 3), num_crops=4, flip_prob=0, rot_prob=0, shift_prob=0, multiple_of=(8,) * len(spatial))
    views.set_random_state(3)
    region = torch.rand(1, *spatial)
    out = views({"image": region})
    cell = (*spatial[:-2], 8, 8)
    assert out["bases"].shape == (9, 1, *cell) and out["crops"].shape == (4, 1, *cell)
    for g in range(9):
        r, c = divmod(g, 3)
        torch.testing.assert_close(out["bases"][g], region[..., r * 8 : r * 8 + 8, c * 8 : c * 8 + 8])
    views.set_random_state(3)
    origins = views.sample_origins(spatial)
    for k, (r, c) in enumerate(origins):
        torch.testing.assert_close(out["crops"][k], region[..., r : r + 8, c : c + 8])
    torch.testing.assert_close(out["labels"], overlap_labels(torch.from_numpy(origins), (8, 8), (3, 3), (8, 8)).float())
    assert torch.allclose(out["labels"].sum(1), torch.ones(4))


def test_views_augment_after_labels_and_validate_sizes() -> None:
    views = VoCoViews(grid=(2, 2), num_crops=8, flip_prob=1.0, rot_prob=0, shift_prob=0)
    views.set_random_state(0)
    region = torch.rand(1, 16, 16)
    out = views({"image": region})
    views.set_random_state(0)
    origins = views.sample_origins((16, 16))
    r, c = origins[0]
    torch.testing.assert_close(out["crops"][0], region[..., r : r + 8, c : c + 8].flip(1).flip(2))
    with pytest.raises(ValueError, match="divisible"):
        views({"image": torch.rand(1, 15, 16)})
    with pytest.raises(ValueError, match="multiples of the patch"):
        VoCoViews(grid=(3, 3), multiple_of=(8, 8))({"image": torch.rand(1, 36, 36)})


# -- losses against loops ---------------------------------------------------------------------------
def loop_assign(x: np.ndarray, b: np.ndarray) -> np.ndarray:
    out = np.zeros((x.shape[0], b.shape[0]))
    for i in range(x.shape[0]):
        for j in range(b.shape[0]):
            out[i, j] = max(0.0, x[i] @ b[j] / (np.linalg.norm(x[i]) * np.linalg.norm(b[j])))
    return out


def loop_ce(y: np.ndarray, logit: np.ndarray, form: str) -> tuple[float, float]:
    pos, ysum, neg, nzero = 0.0, 0.0, 0.0, 0
    for i in range(y.shape[0]):
        for j in range(y.shape[1]):
            pos += -y[i, j] * np.log(1 - abs(y[i, j] - logit[i, j]) + 1e-6)
            ysum += y[i, j]
            if y[i, j] == 0:
                nzero += 1
                neg += -np.log(1 - logit[i, j] + 1e-6) if form == "log" else logit[i, j] ** 2
    return pos / (ysum + 1e-6), neg / (nzero + 1e-6)


def loop_reg(b: np.ndarray) -> float:
    total, num = 0.0, 0
    for i in range(b.shape[0] - 1):
        for j in range(i + 1, b.shape[0]):
            total += loop_assign(b[i : i + 1], b[j : j + 1])[0, 0] ** 2
            num += 1
    return total / num


def random_labels(b: int, k: int, g: int, rng: np.random.Generator) -> np.ndarray:
    y = rng.random((b, k, g)) * (rng.random((b, k, g)) < 0.4)  # exact zeros included
    return y / np.maximum(y.sum(-1, keepdims=True), 1e-9)


@pytest.mark.parametrize("form", ["log", "square"])
def test_elementary_terms_match_loops(form: str) -> None:
    rng = np.random.default_rng(0)
    b, k, g, p = 3, 4, 9, 7
    x, bases = rng.normal(size=(b, k, p)), rng.normal(size=(b, g, p))
    y = random_labels(b, k, g, rng)
    logits = online_assign(torch.from_numpy(x), torch.from_numpy(bases))
    for i in range(b):
        want_l = loop_assign(x[i], bases[i])
        np.testing.assert_allclose(logits[i].numpy(), want_l, rtol=1e-12, atol=1e-12)
        want_pos, want_neg = loop_ce(y[i], want_l, form)
        assert position_loss(torch.from_numpy(y), logits)[i].item() == pytest.approx(want_pos, rel=1e-10)
        assert negative_loss(torch.from_numpy(y), logits, form)[i].item() == pytest.approx(want_neg, rel=1e-10)
        assert base_regularisation(torch.from_numpy(bases))[i].item() == pytest.approx(loop_reg(bases[i]), rel=1e-10)


def test_regulariser_stops_gradient_on_one_side() -> None:
    bases = torch.rand(1, 3, 5, dtype=torch.float64, requires_grad=True)  # positive: every cosine > 0
    base_regularisation(bases).sum().backward()
    assert bases.grad[0, 2].abs().sum() == 0  # the last base only appears as the detached partner
    assert bases.grad[0, 0].abs().sum() > 0


def _tiny_voco(version: str, spatial_dims: int = 3, img: int = 16, **kw) -> VoCo:
    torch.manual_seed(0)
    enc = BACKBONES.build("vit", spatial_dims=spatial_dims, in_chans=1, img_size=img, patch_size=8, embed_dim=48, depth=2)
    return VoCo(enc, version=version, proj_hidden_dim=32, proj_dim=16, **kw)


@pytest.mark.parametrize("version", ["large_scale", "original"])
def test_objective_terms_match_loops(version: str) -> None:
    voco = _tiny_voco(version).double()
    rng = np.random.default_rng(1)
    b, k, g, p = 3, 2, 9, 6
    y = random_labels(b, k, g, rng)
    xs, bs, xt, bt = (rng.normal(size=s) for s in [(b, k, p), (b, g, p), (b, k, p), (b, g, p)])
    terms = voco.losses(*(torch.from_numpy(a) for a in (y, xs, bs, xt, bt)))
    for i in range(b):
        if version == "large_scale":
            logit = loop_assign(xs[i], bt[i])
            pos, neg = loop_ce(y[i], logit, "log")
            j = (i + 1) % b
            target = loop_assign(xt[i], bt[j])
            ip, ineg = loop_ce(target, loop_assign(xs[i], bs[j]), "log")
            assert terms["inter"][i].item() == pytest.approx(ip + ineg, rel=1e-10)
        else:
            logit = 0.5 * (loop_assign(xs[i], bt[i]) + loop_assign(xt[i], bs[i]))
            pos, neg = loop_ce(y[i], logit, "square")
            assert "inter" not in terms
        assert terms["pos"][i].item() == pytest.approx(pos, rel=1e-10)
        assert terms["neg"][i].item() == pytest.approx(neg, rel=1e-10)
        assert terms["reg"][i].item() == pytest.approx(loop_reg(bs[i]), rel=1e-10)


def test_inter_volume_target_is_detached() -> None:
    voco = _tiny_voco("large_scale").double()
    xt = torch.randn(2, 2, 6, dtype=torch.float64, requires_grad=True)
    bt = torch.randn(2, 9, 6, dtype=torch.float64, requires_grad=True)
    y = torch.from_numpy(random_labels(2, 2, 9, np.random.default_rng(0)))
    terms = voco.losses(y, torch.randn(2, 2, 6, dtype=torch.float64), torch.randn(2, 9, 6, dtype=torch.float64), xt, bt)
    assert not terms["inter"].requires_grad or torch.autograd.grad(terms["inter"].sum(), xt, allow_unused=True)[0] is None


@pytest.mark.parametrize("version", ["large_scale", "original"])
def test_ema_update_and_no_teacher_gradients(version: str) -> None:
    voco = _tiny_voco(version)
    views = voco.view_transform()
    views.set_random_state(0)
    batch = default_collate([views({"image": torch.rand(1, 16, 48, 48)}) for _ in range(2)])
    out = voco(batch)
    out.loss.backward()
    assert all(p.grad is None for p in voco.teacher_head.parameters())
    teacher0 = copy.deepcopy(voco.teacher_head.state_dict())
    with torch.no_grad():
        for prm in voco.student_head.parameters():
            prm.add_(1.0)
    voco.on_train_step_end(1, 10)
    for name, prm in voco.student_head.state_dict().items():
        torch.testing.assert_close(voco.teacher_head.state_dict()[name], 0.9 * teacher0[name] + 0.1 * prm)
    assert torch.isfinite(out.loss) and out.embeddings.shape == (2, 48)


def test_2d_forward() -> None:
    voco = _tiny_voco("large_scale", spatial_dims=2, img=16)
    views = voco.view_transform()
    views.set_random_state(0)
    batch = default_collate([views({"image": torch.rand(1, 48, 48)}) for _ in range(3)])
    assert batch["bases"].shape == (3, 9, 1, 16, 16)
    out = voco(batch)
    out.loss.backward()
    assert torch.isfinite(out.loss) and set(out.terms) >= {"pos", "neg", "inter", "reg"}


# -- learning ---------------------------------------------------------------------------------------
def test_voco_learns_on_demo_volumes(demo_store_3d: str, fit_objective) -> None:
    voco = _tiny_voco("large_scale", spatial_dims=3, img=16)
    ds = RandomCropDataset(demo_store_3d, (16, 48, 48), length=96, transform=voco.view_transform())
    loader = DataLoader(ds, batch_size=8)
    fixed = next(iter(loader))
    opt = torch.optim.AdamW([p for p in voco.parameters() if p.requires_grad], lr=3e-3)

    def fixed_loss() -> tuple[float, torch.Tensor]:
        voco.eval()
        with torch.no_grad():
            out = voco(fixed)
        voco.train()
        return out.terms["pos"].item() + out.terms["neg"].item(), out.embeddings

    before, _ = fixed_loss()
    fit_objective(voco, itertools.chain(loader, loader, loader), 3 * len(loader), opt)
    after, emb = fixed_loss()
    assert after < 0.9 * before, (before, after)
    z = F.normalize(emb, dim=1)
    assert z.std(dim=0).mean() > 0.01  # not collapsed


# -- channel identity -------------------------------------------------------------------------------
NAMES = ["t1", "t1ce", "t2", "flair"]


def _channel_batch(mask: bool = False) -> dict:
    """Two 4-channel 2D regions (48x48) through VoCo's views, named ``t1|t1ce|t2|flair`` (with
    ``channel_mask`` rows ``[1, 0, 1, 1]`` and ``[1, 1, 1, 0]`` when ``mask``)."""
    views = VoCoViews(grid=(3, 3), num_crops=2, multiple_of=(8, 8))
    views.set_random_state(0)
    gen = torch.Generator().manual_seed(0)
    samples = []
    for i in range(2):
        sample = {"image": torch.rand(4, 48, 48, generator=gen), "channel_names": "|".join(NAMES)}
        if mask:
            sample["channel_mask"] = torch.tensor([True, i == 1, True, i == 0])
        samples.append(views(sample))
    return default_collate(samples)


def _permute_sample(batch: dict, i: int, perm: list[int], names: bool) -> dict:
    """``batch`` with sample ``i``'s channels (bases and crops) in the order ``perm``, and its names too
    when ``names``."""
    out = {**batch, "bases": batch["bases"].clone(), "crops": batch["crops"].clone()}
    out["bases"][i] = batch["bases"][i][:, perm]
    out["crops"][i] = batch["crops"][i][:, perm]
    if names:
        out["channel_names"] = list(batch["channel_names"])
        out["channel_names"][i] = "|".join(NAMES[p] for p in perm)
    return out


def _chada_voco(version: str) -> VoCo:
    torch.manual_seed(0)
    enc = BACKBONES.build(
        "chada_vit", spatial_dims=2, img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2,
        channel_vocab=NAMES, packing="pad",
    )  # fmt: skip
    return VoCo(enc, version=version, proj_hidden_dim=16, proj_dim=8).eval()


def _loss(voco: VoCo, batch: dict) -> float:
    with torch.no_grad():
        return voco(batch).loss.item()


def test_views_carry_the_channel_keys() -> None:
    batch = _channel_batch(mask=True)
    assert batch["channel_names"] == ["t1|t1ce|t2|flair"] * 2
    assert batch["channel_mask"].tolist() == [[True, False, True, True], [True, True, True, False]]
    assert batch["bases"].shape == (2, 9, 4, 16, 16) and batch["crops"].shape == (2, 2, 4, 16, 16)


def test_intensity_shift_leaves_absent_channels_at_zero() -> None:
    """A sequence the case lacks is a zero channel: the per-crop intensity shift must not make it a
    constant one (a fixed-channel encoder would read it as signal)."""
    views = VoCoViews(grid=(3, 3), num_crops=4, multiple_of=(8, 8), shift_prob=1.0, augment_bases=True)
    views.set_random_state(0)
    image = torch.rand(4, 48, 48)
    image[1] = 0.0
    out = views({"image": image, "channel_mask": torch.tensor([True, False, True, True])})
    for key in ("crops", "bases"):
        assert out[key][:, 1].abs().max() == 0.0
    shifted = views({"image": image})["crops"][:, 1]  # no mask: every channel is shifted
    assert shifted.abs().max() > 0.0


def test_crop_channel_kwargs_follow_the_stacking_order() -> None:
    voco = _chada_voco("large_scale")
    batch = _channel_batch(mask=True)
    batch["channel_names"] = ["t1|t1ce|t2|flair", "flair|t2|t1ce|t1"]
    kwargs = crop_channel_kwargs(voco.encoder, batch, crops=2, bases=3)
    a, b = NAMES, NAMES[::-1]
    assert kwargs["channel_names"] == [a, a, b, b, a, a, a, b, b, b]  # crops (B K), then bases (B G)
    rows = (~batch["channel_mask"])[[0, 0, 1, 1, 0, 0, 0, 1, 1, 1]]
    torch.testing.assert_close(kwargs["channel_padding_mask"], rows)


@pytest.mark.parametrize("version", ["large_scale", "original"])
def test_chada_vit_gets_the_channel_names(version: str) -> None:
    """Permuting one sample's channels together with its names leaves the loss as it was (the encoder
    embeds channels by name); permuting the channels alone changes it."""
    voco = _chada_voco(version)
    batch = _channel_batch()
    perm = [2, 0, 3, 1]
    base = _loss(voco, batch)
    assert _loss(voco, _permute_sample(batch, 1, perm, names=True)) == pytest.approx(base, rel=1e-5, abs=1e-6)
    assert abs(_loss(voco, _permute_sample(batch, 1, perm, names=False)) - base) > 1e-4


def test_chada_vit_omits_masked_channels() -> None:
    """A channel marked missing in ``channel_mask`` does not reach the encoder, whatever it holds."""
    voco = _chada_voco("large_scale")
    batch = _channel_batch(mask=True)
    base = _loss(voco, batch)
    noisy = {**batch, "bases": batch["bases"].clone(), "crops": batch["crops"].clone()}
    for i, c in [(0, 1), (1, 3)]:  # the channels each sample's mask drops
        noisy["bases"][i, :, c] = torch.randn_like(noisy["bases"][i, :, c])
        noisy["crops"][i, :, c] = torch.randn_like(noisy["crops"][i, :, c])
    assert _loss(voco, noisy) == pytest.approx(base, rel=1e-5, abs=1e-6)
    unmasked = {k: v for k, v in batch.items() if k != "channel_mask"}
    assert abs(_loss(voco, unmasked) - base) > 1e-4  # the mask itself does reach the encoder


def test_fixed_channel_vit_ignores_the_channel_names() -> None:
    torch.manual_seed(0)
    enc = BACKBONES.build(
        "vit", spatial_dims=2, in_chans=4, img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2
    )
    voco = VoCo(enc, proj_hidden_dim=16, proj_dim=8).eval()
    batch = _channel_batch(mask=True)
    assert crop_channel_kwargs(enc, batch, 2, 9) == {}
    bare = {k: v for k, v in batch.items() if k not in ("channel_names", "channel_mask")}
    assert _loss(voco, batch) == _loss(voco, bare)
    assert _loss(voco, _permute_sample(batch, 1, [2, 0, 3, 1], names=True)) != _loss(voco, batch)
