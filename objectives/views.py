"""Per-sample views, reseeded per sample: DINO's multi-crop (global + local crops, also the base of
Hi-End-MAE's views) and random flips (MAE).

Every transform here draws all its random parameters for a sample up front, in one call to a numpy
``RandomState``, and then does the pixel work with plain torch ops on plain tensors (slicing, one
``F.interpolate`` per crop, flips, and blur / intensity ops vectorised over the views of a size).
There is no per-call pipeline bookkeeping (MONAI's reseeding of every inner transform and its
metadata tensors cost ~15 ms per 28^2 sample of 6 crops; this costs well under 1 ms).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import Randomizable
from monai.utils import MAX_SEED
from torch import Tensor

from ssl_med.geometry import GeometryError, override, round_up
from ssl_med.objective import Sample


class ReseededViews(Randomizable):
    """Base of per-sample view transforms that draw their parameters from one ``RandomState`` per call.

    Once :meth:`set_random_state` has been called the draws come from ``self.R`` (the crop dataset
    seeds a ``Randomizable`` transform from ``(seed, index)`` before each sample, so views do not
    depend on the number of workers); before that, every call uses a fresh ``RandomState`` seeded
    from torch's RNG (differently seeded in each DataLoader worker; reproducible under
    ``torch.manual_seed``).
    """

    _seeded = False

    def set_random_state(
        self, seed: int | None = None, state: np.random.RandomState | None = None
    ) -> ReseededViews:
        """As MONAI's, but an integer seed reseeds this transform's own ``RandomState`` in place: the
        same stream as ``RandomState(seed)`` without building one per sample (~0.2 ms)."""
        if isinstance(seed, (int, np.integer)):
            self.R = self._own_rng()
            self.R.seed(int(seed) % MAX_SEED)
        else:
            super().set_random_state(seed, state)
        self._seeded = True
        return self

    def _own_rng(self) -> np.random.RandomState:
        if "_rng" not in self.__dict__:
            self._rng = np.random.RandomState()
        return self._rng

    def randomize(self, data: Any = None) -> None:
        """Nothing to draw ahead: :meth:`rng` hands out the generator each call draws from."""

    def rng(self) -> np.random.RandomState:
        """The generator of this call: ``self.R`` when seeded, else one seeded from torch's RNG."""
        if self._seeded:
            return self.R
        rng = self._own_rng()
        rng.seed(int(torch.randint(0, 2**31 - 1, (1,))))
        return rng


def plain_image(sample: Sample, dtype: torch.dtype | None = None) -> Tensor:
    """``sample["image"]`` as a plain tensor (a MONAI ``MetaTensor`` unwrapped, so the pixel ops here pay no
    metadata bookkeeping), cast to ``dtype`` when given."""
    image = torch.as_tensor(sample["image"], dtype=dtype)
    return image.as_tensor() if hasattr(image, "as_tensor") else image


# -- pixel ops --------------------------------------------------------------------------------------
def gaussian_blur(x: Tensor, sigma: Tensor | np.ndarray | float) -> Tensor:
    """Isotropic Gaussian blur of ``(N, C, *S)`` (2D or 3D), one ``sigma`` per image ``(N,)`` (or one
    for all); separable, replicate padding, radius ``ceil(3 * sigma)`` (at least 1), kernels normalised to 1.

    Small inputs take a pad-unfold-weighted-sum path per axis (grouped convolutions cost ~0.3 ms a
    call on CPU whatever the size), larger ones grouped convolutions; both compute the same sums.
    """
    n, c, nd = x.shape[0], x.shape[1], x.ndim - 2
    sig = torch.as_tensor(sigma).detach().cpu().numpy() if isinstance(sigma, Tensor) else np.asarray(sigma)
    sig = np.broadcast_to(sig.astype(np.float64).reshape(-1), (n,))[:, None]  # (N, 1)
    radii = np.maximum(1, np.ceil(3 * sig))
    radius = int(radii.max())
    t = np.arange(-radius, radius + 1, dtype=np.float64)
    # each image's kernel is cut at its own radius, so an image's blur does not depend on the others
    kernel = np.exp(-0.5 * (t / sig) ** 2) * (np.abs(t) <= radii)  # (N, k)
    kernel = torch.as_tensor(kernel / kernel.sum(axis=1, keepdims=True), dtype=x.dtype, device=x.device)
    k = kernel.shape[1]
    small = x.numel() * k * nd <= _UNFOLD_MAX_WORK
    if not small:
        kernel = kernel.repeat_interleave(c, dim=0)  # (N * C, k): one group per image and channel
    y = x if small else x.reshape(1, n * c, *x.shape[2:])
    for axis in range(nd):
        pad = [0] * (2 * nd)
        pad[2 * (nd - 1 - axis)] = pad[2 * (nd - 1 - axis) + 1] = radius  # F.pad lists the last axis first
        y = F.pad(y, pad, mode="replicate")
        if small:  # (N, C, ..., S_axis, ..., k) windows times the per-image kernel, summed
            y = (y.unfold(2 + axis, k, 1) * kernel.view(n, *([1] * (nd + 1)), k)).sum(dim=-1)
        else:
            shape = [1] * nd
            shape[axis] = k
            conv = F.conv2d if nd == 2 else F.conv3d
            y = conv(y, kernel.view(n * c, 1, *shape), groups=n * c)
    return y.reshape(x.shape)


_UNFOLD_MAX_WORK = 2**18  # elements x taps x axes below which the unfold path is faster


def _per_view(values: np.ndarray, nd: int) -> Tensor:
    """``(V,)`` numpy -> ``(V, 1, *[1] * nd)`` float32 tensor, to broadcast over ``(V, C, *S)``."""
    return torch.from_numpy(values.astype(np.float32)).view(-1, 1, *([1] * nd))


# -- multi-crop -------------------------------------------------------------------------------------
@dataclass
class CropParams:
    """Parameters of ``V`` crops of one output size, drawn for one sample (see :func:`draw_crops`).

    Attributes:
        start, size: ``(V, nd)`` integer crop boxes in the input's voxel grid.
        flip: ``(V, nd)`` bool, flip of the output along each spatial axis.
        brightness, contrast: ``(V,)`` intensity factors (1 where not jittered).
        sigma: ``(V,)`` blur sigma in output voxels (0 where not blurred).
        solarize: ``(V,)`` bool.
    """

    start: np.ndarray
    size: np.ndarray
    flip: np.ndarray
    brightness: np.ndarray
    contrast: np.ndarray
    sigma: np.ndarray
    solarize: np.ndarray


def draw_crops(
    rng: np.random.RandomState,
    spatial_shape: Sequence[int],
    n: int,
    scale: Sequence[float],
    flip_axes: Sequence[int],
    flip_prob: float,
    jitter_prob: float,
    brightness: float,
    contrast: float,
    blur_prob: Sequence[float],
    sigma_range: Sequence[float],
    solarize_prob: Sequence[float],
) -> CropParams:
    """Draws ``n`` crops from one ``rng.random_sample((n, 2 nd + nd + 7))`` call.

    Crop sides are integers drawn uniformly per axis in ``[ceil(lo * s), ceil(hi * s)]`` (capped at
    ``s``) with ``(lo, hi) = scale ** (1 / nd)``, so the crop's area (volume) fraction lies in
    ``scale`` up to rounding; origins are uniform over the valid positions. Brightness multiplies by
    ``1 + U(-brightness, brightness)`` and contrast scales about the mean by ``1 + U(-contrast,
    contrast)``, each with probability ``jitter_prob``; flips with ``flip_prob`` per axis of
    ``flip_axes``; blur with ``blur_prob[i]`` and ``sigma ~ U(sigma_range)``; solarisation with
    ``solarize_prob[i]`` (per-view probabilities, length ``n``).
    """
    nd = len(spatial_shape)
    dims = np.asarray(spatial_shape, dtype=np.int64)
    u = rng.random_sample((n, 3 * nd + 7))
    lo = np.ceil(scale[0] ** (1 / nd) * dims).astype(np.int64)
    hi = np.minimum(np.ceil(scale[1] ** (1 / nd) * dims).astype(np.int64), dims)
    lo = np.minimum(lo, hi)
    size = lo + np.floor(u[:, :nd] * (hi - lo + 1)).astype(np.int64)
    start = np.floor(u[:, nd : 2 * nd] * (dims - size + 1)).astype(np.int64)
    flip = np.zeros((n, nd), dtype=bool)
    axes = list(flip_axes)
    flip[:, axes] = u[:, 2 * nd : 2 * nd + len(axes)] < flip_prob
    v = u[:, 3 * nd :]
    ones = np.ones(n)
    bright = np.where(v[:, 0] < jitter_prob, 1 + brightness * (2 * v[:, 1] - 1), ones)
    contr = np.where(v[:, 2] < jitter_prob, 1 + contrast * (2 * v[:, 3] - 1), ones)
    sigma = np.where(
        v[:, 4] < np.asarray(blur_prob), sigma_range[0] + (sigma_range[1] - sigma_range[0]) * v[:, 5], 0.0
    )
    solarize = v[:, 6] < np.asarray(solarize_prob)
    return CropParams(start, size, flip, bright, contr, sigma, solarize)


def render_crops(image: Tensor, p: CropParams, out_size: Sequence[int], threshold: float = 0.5) -> Tensor:
    """Crops ``image (C, *S)`` as drawn in ``p`` -> ``(V, C, *out_size)`` in ``[0, 1]``.

    Per view: crop (slice), resize (bilinear / trilinear, ``align_corners=False``, skipped when the
    crop already has ``out_size``), flips; then over all views at once: brightness, contrast about
    each view's mean, Gaussian blur, solarisation (``x -> 1 - x`` where ``x >= threshold``), clamp.
    """
    nd = image.ndim - 1
    mode = "bilinear" if nd == 2 else "trilinear"
    out_size = tuple(int(s) for s in out_size)
    views = []
    for start, size, flip in zip(p.start.tolist(), p.size.tolist(), p.flip):
        y = image[(slice(None), *(slice(a, a + s) for a, s in zip(start, size)))].unsqueeze(0)
        if tuple(size) != out_size:
            y = F.interpolate(y, size=out_size, mode=mode, align_corners=False)
        if flip.any():
            y = torch.flip(y, [2 + a for a in np.flatnonzero(flip).tolist()])
        views.append(y)
    x = torch.cat(views)
    if (p.brightness != 1).any() or (p.contrast != 1).any():
        # brightness b then contrast c about the mean m of b * x: b * c * x + b * (1 - c) * mean(x)
        mean = x.reshape(len(x), -1).mean(dim=1).view(-1, *([1] * (nd + 1)))
        scale = _per_view(p.brightness * p.contrast, nd)
        shift = _per_view(p.brightness * (1 - p.contrast), nd)
        x = torch.addcmul(mean * shift, x, scale)
    blurred = np.flatnonzero(p.sigma > 0)
    if len(blurred) == len(x):
        x = gaussian_blur(x, p.sigma)
    elif len(blurred):
        idx = torch.from_numpy(blurred)
        x = x.index_copy(0, idx, gaussian_blur(x[idx], p.sigma[blurred]))
    if p.solarize.any():
        flag = torch.from_numpy(p.solarize).view(-1, 1, *([1] * nd))
        x = torch.where(flag & (x >= threshold), 1.0 - x, x)
    return x.clamp_(0.0, 1.0)


def _patch_multiple(size: float, patch: int) -> int:
    return max(patch, round(size / patch) * patch)


class MultiCropViews(ReseededViews):
    """Per-sample DINO multi-crop: ``{"image": (C, *S)}`` -> global and local crops.

    Output (collatable by ``default_collate``):
        ``global_crops``: ``(2, C, *G)``; ``local_crops``: ``(n_local, C, *L)`` (``n_local`` may be 0).

    Views as DINO's reference recipe (see :func:`draw_crops` for the crop and jitter draws): global
    crop 1 is always blurred, global crop 2 blurred with probability 0.1 and solarised with
    ``solarize_prob``, local crops blurred with probability 0.5; ``blur_sigma`` is given for a 224 px
    crop and scaled by ``min(crop size) / 224``. Parameters come from :meth:`draw` (one call to the
    generator per crop group), pixels from :func:`render_crops`. Seeding: see :class:`ReseededViews`.

    Args:
        spatial_dims, patch_size: of the encoder (crop sizes are multiples of the patch).
        n_local_crops: local crops per sample (reference 8; 0 for globals only).
        global_crop_size, local_crop_size: output sizes ``G`` and ``L``; default the incoming crop
            rounded to the patch, and ``local_crop_fraction`` of ``G`` (reference 96 / 224).
        global_crop_scale, local_crop_scale: area (volume) fraction ranges of the crops in the input.
        flip_axes, flip_prob: spatial axes flipped (default the last) and the probability per axis.
        jitter_prob, brightness, contrast: grey-level jitter (see :func:`draw_crops`).
        blur_sigma: blur sigma range for a 224 px crop. solarize_prob: of global crop 2.

    :class:`~objectives.dino.DINO` takes these (but the first two) as its ``views`` mapping, the
    ``objective.views`` group of the config.
    """

    def __init__(
        self,
        spatial_dims: int,
        patch_size: Sequence[int],
        n_local_crops: int = 8,
        global_crop_size: Sequence[int] | None = None,
        local_crop_size: Sequence[int] | None = None,
        local_crop_fraction: float = 96 / 224,
        global_crop_scale: Sequence[float] = (0.32, 1.0),
        local_crop_scale: Sequence[float] = (0.05, 0.32),
        flip_axes: Sequence[int] | None = None,
        flip_prob: float = 0.5,
        jitter_prob: float = 0.8,
        brightness: float = 0.4,
        contrast: float = 0.4,
        blur_sigma: Sequence[float] = (0.1, 2.0),
        solarize_prob: float = 0.2,
    ) -> None:
        self.spatial_dims = spatial_dims
        self.patch_size = tuple(patch_size)
        self.n_local_crops = n_local_crops
        self.global_crop_size = tuple(global_crop_size) if global_crop_size is not None else None
        self.local_crop_size = tuple(local_crop_size) if local_crop_size is not None else None
        self.local_crop_fraction = local_crop_fraction
        self.global_crop_scale = tuple(global_crop_scale)
        self.local_crop_scale = tuple(local_crop_scale)
        self.flip_axes = tuple(flip_axes) if flip_axes is not None else (spatial_dims - 1,)
        self.flip_prob = flip_prob
        self.jitter_prob = jitter_prob
        self.brightness = brightness
        self.contrast = contrast
        self.blur_sigma = tuple(blur_sigma)
        self.solarize_prob = solarize_prob
        self._sizes: dict[tuple[int, ...], tuple[tuple[int, ...], tuple[int, ...]]] = {}

    def crop_sizes(self, spatial_shape: Sequence[int]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Global and local crop sizes for an incoming crop of ``spatial_shape`` (multiples of the patch);
        explicit sizes that are not raise a :class:`GeometryError` naming the rounded-up size."""
        p = self.patch_size
        glob = self.global_crop_size or tuple(_patch_multiple(s, q) for s, q in zip(spatial_shape, p))
        loc = self.local_crop_size or tuple(
            _patch_multiple(g * self.local_crop_fraction, q) for g, q in zip(glob, p)
        )
        for name, size in (("global", glob), ("local", loc)):
            if len(size) != self.spatial_dims:
                raise GeometryError(
                    f"DINO {name} crop size {size} does not have spatial_dims={self.spatial_dims} values"
                )
            if any(s % q for s, q in zip(size, p)):
                raise GeometryError(
                    f"DINO {name} crop size {size} is not a multiple of the patch size {p}",
                    [override(f"objective.views.{name}_crop_size", round_up(size, p))],
                )
        return tuple(glob), tuple(loc)

    def _sizes_for(self, spatial_shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
        if spatial_shape not in self._sizes:
            self._sizes[spatial_shape] = self.crop_sizes(spatial_shape)
        return self._sizes[spatial_shape]

    def _draw(
        self, rng: np.random.RandomState, spatial_shape: Sequence[int], n: int, out_size: Sequence[int],
        scale: Sequence[float], blur_prob: Sequence[float], solarize_prob: Sequence[float],
    ) -> CropParams:  # fmt: skip
        sigma = tuple(s * min(out_size) / 224 for s in self.blur_sigma)
        return draw_crops(
            rng, spatial_shape, n, scale, self.flip_axes, self.flip_prob, self.jitter_prob, self.brightness,
            self.contrast, blur_prob, sigma, solarize_prob,
        )  # fmt: skip

    def draw(
        self, spatial_shape: Sequence[int], rng: np.random.RandomState | None = None
    ) -> tuple[CropParams, CropParams]:
        """Parameters of the 2 global and ``n_local_crops`` local crops of an input of ``spatial_shape``
        (from :meth:`rng` unless given)."""
        rng = self.rng() if rng is None else rng
        glob, loc = self._sizes_for(tuple(spatial_shape))
        g = self._draw(rng, spatial_shape, 2, glob, self.global_crop_scale, (1.0, 0.1), (0.0, self.solarize_prob))
        n = self.n_local_crops
        loc_p = self._draw(rng, spatial_shape, n, loc, self.local_crop_scale, (0.5,) * n, (0.0,) * n)
        return g, loc_p

    def __call__(self, sample: Sample) -> Sample:
        image = plain_image(sample, torch.float32)
        glob_size, loc_size = self._sizes_for(tuple(image.shape[1:]))
        g, loc = self.draw(image.shape[1:])
        out = {k: v for k, v in sample.items() if k != "image"}
        out["global_crops"] = render_crops(image, g, glob_size)
        if self.n_local_crops:
            out["local_crops"] = render_crops(image, loc, loc_size)
        else:
            out["local_crops"] = image.new_zeros((0, image.shape[0], *loc_size))
        return out


# -- flips ------------------------------------------------------------------------------------------
class RandFlips(ReseededViews):
    """``{"image": (C, *S)}`` -> the same keys with ``image`` flipped along each of ``axes`` (spatial
    axes, default all) with probability ``prob`` each, drawn in one call. Seeding: see
    :class:`ReseededViews`."""

    def __init__(self, spatial_dims: int, prob: float = 0.5, axes: Sequence[int] | None = None) -> None:
        self.prob = prob
        self.axes = tuple(axes) if axes is not None else tuple(range(spatial_dims))

    def __call__(self, sample: Sample) -> Sample:
        return self.apply(sample, self.rng())

    def apply(self, sample: Sample, rng: np.random.RandomState) -> Sample:
        """The flips drawn from ``rng`` (one ``random_sample(len(axes))`` call)."""
        u = rng.random_sample(len(self.axes))
        image = torch.as_tensor(sample["image"])
        dims = [1 + a for a, ui in zip(self.axes, u.tolist()) if ui < self.prob]
        return {**sample, "image": torch.flip(image, dims) if dims else image}
