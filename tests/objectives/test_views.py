"""Per-sample views (objectives/views.py and the MAE / Hi-End-MAE views): shapes, reseeding, the drawn
parameters and what each pixel op does."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF
from torch.utils.data import DataLoader

import objectives.views as views_mod
from objectives.hi_end_mae import HiEndMAEViews
from objectives.mae import MAEViews
from objectives.views import CropParams, MultiCropViews, RandFlips, gaussian_blur, render_crops
from ssl_med.data.crops import RandomCropDataset


def _params(n: int, nd: int, shape: tuple[int, ...], **overrides: np.ndarray) -> CropParams:
    """``n`` identity crops of the whole ``shape``: no flip, jitter, blur or solarisation."""
    p = dict(
        start=np.zeros((n, nd), dtype=np.int64),
        size=np.tile(np.asarray(shape, dtype=np.int64), (n, 1)),
        flip=np.zeros((n, nd), dtype=bool),
        brightness=np.ones(n),
        contrast=np.ones(n),
        sigma=np.zeros(n),
        solarize=np.zeros(n, dtype=bool),
    )
    p.update(overrides)
    return CropParams(**p)


def _ramp(shape: tuple[int, ...], axis: int) -> torch.Tensor:
    """``(1, *shape)`` with value ``i / (shape[axis] - 1)`` at index ``i`` along spatial ``axis``."""
    n = shape[axis]
    view = [1] * len(shape)
    view[axis] = n
    return (torch.arange(n, dtype=torch.float32) / (n - 1)).view(1, *view).expand(1, *shape).clone()


# -- multi-crop: output ------------------------------------------------------------------------------
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_multicrop_shapes_and_range(spatial_dims: int) -> None:
    views = MultiCropViews(spatial_dims, (4,) * spatial_dims, n_local_crops=3, brightness=0.9, contrast=0.9)
    image = torch.rand((2,) + (28,) * spatial_dims)
    out = views.set_random_state(seed=0)({"image": image, "label": 7})
    assert out["global_crops"].shape == (2, 2) + (28,) * spatial_dims
    assert out["local_crops"].shape == (3, 2) + (12,) * spatial_dims  # 28 * 96/224 = 12
    assert out["label"] == 7 and "image" not in out
    for key in ("global_crops", "local_crops"):
        x = out[key]
        assert x.dtype == torch.float32 and type(x) is torch.Tensor and x.is_contiguous()
        assert x.min() >= 0 and x.max() <= 1
    none = MultiCropViews(spatial_dims, (4,) * spatial_dims, n_local_crops=0)({"image": image})
    assert none["local_crops"].shape == (0, 2) + (12,) * spatial_dims


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_multicrop_reseeding(spatial_dims: int) -> None:
    views = MultiCropViews(spatial_dims, (4,) * spatial_dims, n_local_crops=2)
    image = torch.rand((1,) + (20,) * spatial_dims)
    first = views.set_random_state(seed=3)({"image": image})
    torch.manual_seed(123)  # seeded views do not read torch's RNG
    views({"image": image})  # nor depend on what ran before the reseed
    second = views.set_random_state(seed=3)({"image": image})
    other = views.set_random_state(seed=4)({"image": image})
    for key in ("global_crops", "local_crops"):
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=0)
        assert not torch.equal(first[key], other[key])
    # the same seed gives the same stream as MONAI's set_random_state (a fresh RandomState(seed))
    rng = np.random.RandomState(3)
    g, _ = views.draw(image.shape[1:], rng)
    torch.testing.assert_close(render_crops(image, g, (20,) * spatial_dims), first["global_crops"])
    # unseeded: a generator seeded from torch's RNG, reproducible under torch.manual_seed
    fresh = MultiCropViews(spatial_dims, (4,) * spatial_dims, n_local_crops=2)
    torch.manual_seed(0)
    a = fresh({"image": image})
    torch.manual_seed(0)
    b = fresh({"image": image})
    c = fresh({"image": image})
    torch.testing.assert_close(a["local_crops"], b["local_crops"])
    assert not torch.equal(b["local_crops"], c["local_crops"])


def test_views_do_not_depend_on_workers(demo_store_2d: str) -> None:
    views = MultiCropViews(2, (4, 4), n_local_crops=2)

    def batches(workers: int) -> list[dict]:
        data = RandomCropDataset(demo_store_2d, crop_size=(24, 24), transform=views, length=8, seed=5)
        return list(DataLoader(data, batch_size=4, num_workers=workers))

    one, two = batches(0), batches(2)
    for a, b in zip(one, two, strict=True):
        torch.testing.assert_close(a["global_crops"], b["global_crops"], rtol=0, atol=0)
        torch.testing.assert_close(a["local_crops"], b["local_crops"], rtol=0, atol=0)
    assert not torch.equal(one[0]["global_crops"][0], one[0]["global_crops"][1])  # index matters


# -- multi-crop: drawn parameters ------------------------------------------------------------------
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_crop_boxes_lie_in_the_scale_range(spatial_dims: int) -> None:
    views = MultiCropViews(spatial_dims, (4,) * spatial_dims, n_local_crops=4)
    shape = (40, 36, 32)[:spatial_dims]
    dims = np.asarray(shape)
    rng = np.random.RandomState(0)
    for scale, pick in ((views.global_crop_scale, 0), (views.local_crop_scale, 1)):
        lo = np.ceil(scale[0] ** (1 / spatial_dims) * dims)
        hi = np.ceil(scale[1] ** (1 / spatial_dims) * dims)
        drawn = [views.draw(shape, rng)[pick] for _ in range(300)]
        sizes, starts = np.concatenate([p.size for p in drawn]), np.concatenate([p.start for p in drawn])
        assert (sizes >= lo).all() and (sizes <= np.minimum(hi, dims)).all()
        assert (sizes.min(axis=0) == lo).all() and (sizes.max(axis=0) == np.minimum(hi, dims)).all()  # full range
        assert (starts >= 0).all() and (starts.max(axis=0) > 0).all()
        frac = sizes.prod(axis=1) / dims.prod()
        # area fraction in the scale range up to the rounding of each side to whole voxels
        slack = np.prod((hi + 1) / dims) - scale[1]
        assert frac.min() >= scale[0] and frac.max() <= scale[1] + slack
        assert ((starts + sizes) <= dims).all() and ((starts + sizes) == dims).any(axis=0).all()


@pytest.mark.parametrize("axis", [0, 1])
def test_render_crops_the_drawn_box(axis: int) -> None:
    """A ramp along ``axis`` rendered through a crop spans the box's values, reversed when flipped."""
    shape = (30, 30)
    image = _ramp(shape, axis)
    start = np.array([[5, 7], [5, 7]])
    size = np.array([[16, 20], [16, 20]])
    flip = np.array([[False, False], [axis == 0, axis == 1]])
    out = render_crops(image, _params(2, 2, shape, start=start, size=size, flip=flip), (32, 32))
    profile = out[:, 0].mean(dim=2 - axis)  # (2, 32) along the ramp axis
    lo, hi = start[0, axis] / 29, (start[0, axis] + size[0, axis] - 1) / 29
    assert profile[0, 0] == pytest.approx(lo, abs=0.5 / 29) and profile[0, -1] == pytest.approx(hi, abs=0.5 / 29)
    assert (profile[0].diff() >= 0).all()
    torch.testing.assert_close(profile[1], profile[0].flip(0))


def test_flips_jitter_blur_and_solarise_probabilities() -> None:
    views = MultiCropViews(2, (4, 4), n_local_crops=4, flip_axes=(0,), flip_prob=0.3, solarize_prob=0.2)
    rng = np.random.RandomState(0)
    draws = [views.draw((28, 28), rng) for _ in range(2000)]
    g = [d[0] for d in draws]
    loc = [d[1] for d in draws]
    flips = np.concatenate([p.flip for p in g + loc])
    assert flips[:, 1].sum() == 0  # only the listed axis
    assert flips[:, 0].mean() == pytest.approx(0.3, abs=0.02)
    sig_g = np.stack([p.sigma for p in g])
    sig_l = np.concatenate([p.sigma for p in loc])
    assert (sig_g[:, 0] > 0).all()  # global crop 1: always blurred
    assert (sig_g[:, 1] > 0).mean() == pytest.approx(0.1, abs=0.02)
    assert (sig_l > 0).mean() == pytest.approx(0.5, abs=0.02)
    scaled = np.array(views.blur_sigma) * 28 / 224  # sigma given for 224 px, scaled by the crop size
    assert sig_g[sig_g > 0].min() >= scaled[0] and sig_g.max() <= scaled[1]
    assert sig_l[sig_l > 0].max() <= np.array(views.blur_sigma)[1] * 12 / 224
    sol_g = np.stack([p.solarize for p in g])
    assert not sol_g[:, 0].any() and not np.concatenate([p.solarize for p in loc]).any()
    assert sol_g[:, 1].mean() == pytest.approx(0.2, abs=0.02)
    bright = np.concatenate([p.brightness for p in g + loc])
    contrast = np.concatenate([p.contrast for p in g + loc])
    assert (bright != 1).mean() == pytest.approx(0.8, abs=0.02) and (contrast != 1).mean() == pytest.approx(0.8, abs=0.02)
    assert bright.min() >= 0.6 and bright.max() <= 1.4 and contrast.min() >= 0.6 and contrast.max() <= 1.4
    off = MultiCropViews(2, (4, 4), n_local_crops=1, jitter_prob=0.0).draw((28, 28), rng)[1]
    assert (off.brightness == 1).all() and (off.contrast == 1).all()


# -- multi-crop: pixel ops -------------------------------------------------------------------------
def test_brightness_and_contrast() -> None:
    image = 0.25 + 0.5 * torch.rand(1, 16, 16)  # in [0.25, 0.75]: no clamping below
    p = _params(2, 2, (16, 16), brightness=np.array([1.2, 1.0]), contrast=np.array([1.0, 0.5]))
    out = render_crops(image, p, (16, 16))
    torch.testing.assert_close(out[0], image * 1.2)
    torch.testing.assert_close(out[1], (image - image.mean()) * 0.5 + image.mean())


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_blur_removes_high_frequencies(spatial_dims: int) -> None:
    shape = (16,) * spatial_dims
    idx = torch.stack(torch.meshgrid(*(torch.arange(s) for s in shape), indexing="ij")).sum(0)
    checker = (idx % 2).float()[None]  # all energy at the highest frequency
    p = _params(2, spatial_dims, shape, sigma=np.array([0.0, 1.0]))
    out = render_crops(checker, p, shape)
    torch.testing.assert_close(out[0], checker)  # sigma 0: untouched

    def hf_energy(x: torch.Tensor) -> float:
        return float(sum(x.diff(dim=d).pow(2).sum() for d in range(1, x.ndim)))

    assert hf_energy(out[1]) < 0.05 * hf_energy(checker)
    assert out[1].mean() == pytest.approx(0.5, abs=0.02)  # mass kept
    const = torch.full((2, 1, *shape), 0.3)
    torch.testing.assert_close(gaussian_blur(const, torch.tensor([0.5, 1.5])), const)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_blur_paths_agree(spatial_dims: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The unfold path (small inputs) and the grouped-convolution path compute the same blur."""
    x = torch.rand((3, 2) + (12,) * spatial_dims)
    sigma = torch.tensor([0.4, 1.0, 2.5])
    small = gaussian_blur(x, sigma)
    monkeypatch.setattr(views_mod, "_UNFOLD_MAX_WORK", 0)
    big = gaussian_blur(x, sigma)
    torch.testing.assert_close(small, big)
    # one image at a time gives the same (each image gets its own kernel)
    torch.testing.assert_close(torch.cat([gaussian_blur(x[i : i + 1], sigma[i]) for i in range(3)]), big)


def test_solarisation_inverts_above_threshold() -> None:
    image = torch.linspace(0, 1, 64).view(1, 8, 8)
    p = _params(2, 2, (8, 8), solarize=np.array([True, False]))
    out = render_crops(image, p, (8, 8))
    above = image >= 0.5
    torch.testing.assert_close(out[0][above], 1 - image[above])
    torch.testing.assert_close(out[0][~above], image[~above])
    torch.testing.assert_close(out[1], image)


# -- MAE and Hi-End-MAE views ----------------------------------------------------------------------
@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_rand_flips_and_mae_views(spatial_dims: int) -> None:
    image = torch.rand((1,) + (8,) * spatial_dims)
    flips = RandFlips(spatial_dims, prob=0.5)
    subsets = [[1 + a for a in range(spatial_dims) if m >> a & 1] for m in range(2**spatial_dims)]
    counts = np.zeros(spatial_dims)
    for s in range(400):
        out = flips.set_random_state(seed=s)({"image": image})["image"]
        dims = next(d for d in subsets if torch.equal(out, image.flip(d) if d else image))
        counts[[d - 1 for d in dims]] += 1
    assert counts / 400 == pytest.approx(np.full(spatial_dims, 0.5), abs=0.07)  # each axis at flip_prob
    mae = MAEViews(spatial_dims, (4,) * spatial_dims, flip_prob=0.5)
    a = mae.set_random_state(seed=1)({"image": image})
    b = mae.set_random_state(seed=1)({"image": image})
    c = mae.set_random_state(seed=2)({"image": image})
    assert a["mask_noise"].shape == (2**spatial_dims,) and a["mask_noise"].dtype == torch.float32
    assert torch.equal(a["mask_noise"], b["mask_noise"]) and torch.equal(a["image"], b["image"])
    assert not torch.equal(a["mask_noise"], c["mask_noise"])


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_mae_resized_crop_is_a_box_of_the_drawn_area_scaled_back(spatial_dims: int) -> None:
    """With ``crop_scale`` MAE's view is a random box of the given area fraction, resized back to the
    input size, as torchvision's ``resized_crop`` / ``F.interpolate`` of that box give it."""
    image = torch.rand((1,) + (8,) * spatial_dims)
    views = MAEViews(spatial_dims, (4,) * spatial_dims, flip_prob=0.0, crop_scale=(0.5**spatial_dims,) * 2)
    mode = "bilinear" if spatial_dims == 2 else "trilinear"
    origins = set()
    for s in range(30):
        out = views.set_random_state(seed=s)({"image": image})
        assert out["image"].shape == image.shape and out["mask_noise"].shape == (2**spatial_dims,)
        matches = []
        for start in itertools.product(range(5), repeat=spatial_dims):  # every 4-voxel box of 8
            box = image[(slice(None), *(slice(a, a + 4) for a in start))]
            if spatial_dims == 2:
                ref = TF.resized_crop(image, start[0], start[1], 4, 4, [8, 8], antialias=False)
            else:
                ref = F.interpolate(box[None], size=(8,) * 3, mode=mode, align_corners=False)[0]
            if torch.allclose(out["image"], ref, atol=1e-6):
                matches.append(start)
        assert len(matches) == 1
        origins.add(matches[0])
    assert len(origins) > 5  # the box moves between samples
    whole = MAEViews(spatial_dims, (4,) * spatial_dims, flip_prob=0.0, crop_scale=(1.0, 1.0))
    assert torch.equal(whole.set_random_state(seed=0)({"image": image})["image"], image)
    with pytest.raises(ValueError, match="crop_scale"):  # raw stored values would be clamped to [0, 1]
        views({"image": (image * 255).to(torch.uint8)})


def test_hi_end_mae_views() -> None:
    image = torch.rand(1, 8, 8, 8)
    views = HiEndMAEViews(3, flip_prob=0.0, rotate90_prob=1.0, intensity_prob=0.0)
    outs = [views.set_random_state(seed=s)({"image": image})["image"] for s in range(60)]
    ks = [next(k for k in (1, 2, 3) if torch.equal(o, torch.rot90(image, k, dims=(1, 2)))) for o in outs]
    assert set(ks) == {1, 2, 3}  # k uniform in {1, 2, 3}, in the first two spatial axes
    flat = torch.rand(1, 8, 4, 8)  # first two axes differ: no rotation
    assert torch.equal(views({"image": flat})["image"], flat)
    jitter = HiEndMAEViews(2, flip_prob=0.0, rotate90_prob=0.0, intensity_prob=1.0)
    x = torch.rand(1, 8, 8)
    y = jitter.set_random_state(seed=0)({"image": x})["image"]
    scale = (y[0, 0, 1] - y[0, 0, 0]) / (x[0, 0, 1] - x[0, 0, 0])
    shift = y - x * scale
    assert 0.9 <= scale <= 1.1 and not math.isclose(float(scale), 1.0)
    assert shift.std() < 1e-5 and -0.1 <= shift.mean() <= 0.1
    again = jitter.set_random_state(seed=0)({"image": x})["image"]
    assert torch.equal(y, again)
