"""Per-sample multi-crop views, reseeded per sample (DINO's global + local crops, the base that
Hi-End-MAE's views share): MONAI transforms plus solarisation and a sigma-scaled Gaussian blur.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms import (
    Compose,
    Lambdad,
    MapTransform,
    RandFlipd,
    Randomizable,
    RandomizableTransform,
    RandScaleCropd,
    RandScaleIntensityd,
    RandScaleIntensityFixedMeand,
    Resized,
)
from torch import Tensor

from ssl_med.geometry import GeometryError, override, round_up
from ssl_med.objective import Sample


# -- views ----------------------------------------------------------------------------------------
class RandSolarized(RandomizableTransform, MapTransform):
    """Solarisation for ``[0, 1]`` images: ``x -> 1 - x`` where ``x >= threshold``, with probability ``prob``."""

    def __init__(self, keys: str | Sequence[str], prob: float = 0.2, threshold: float = 0.5) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.threshold = threshold

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        d = dict(data)
        self.randomize(None)
        if self._do_transform:
            for key in self.key_iterator(d):
                x = d[key]
                d[key] = torch.where(x >= self.threshold, 1.0 - x, x)
        return d


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Isotropic Gaussian blur of ``(C, *S)`` (2D or 3D), separable, replicate padding, radius ``ceil(3 sigma)``."""
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c, nd = x.shape[0], x.ndim - 1
    conv = F.conv2d if nd == 2 else F.conv3d
    y = x.unsqueeze(0)
    for axis in range(nd):
        shape = [1] * nd
        shape[axis] = kernel.numel()
        pad = [0] * (2 * nd)
        pad[2 * (nd - 1 - axis)] = pad[2 * (nd - 1 - axis) + 1] = radius  # F.pad lists the last axis first
        y = conv(F.pad(y, pad, mode="replicate"), kernel.view(1, 1, *shape).expand(c, 1, *shape), groups=c)
    return y[0]


class RandGaussianBlurd(RandomizableTransform, MapTransform):
    """Gaussian blur with ``sigma ~ U(sigma_range)`` (same on every axis), with probability ``prob``.

    (MONAI's ``RandGaussianSmoothd`` rebuilds its filter module per call: ~20 ms on a 32^2 crop.)
    """

    def __init__(self, keys: str | Sequence[str], sigma_range: Sequence[float], prob: float) -> None:
        MapTransform.__init__(self, keys)
        RandomizableTransform.__init__(self, prob)
        self.sigma_range = (float(sigma_range[0]), float(sigma_range[1]))
        self.sigma = self.sigma_range[0]

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        self.sigma = self.R.uniform(*self.sigma_range)

    def __call__(self, data: dict[str, Any]) -> dict[str, Any]:
        d = dict(data)
        self.randomize()
        if self._do_transform:
            for key in self.key_iterator(d):
                d[key] = gaussian_blur(torch.as_tensor(d[key]), self.sigma)
        return d


def _clamp01(x: Tensor) -> Tensor:
    return x.clamp(0.0, 1.0)


def _patch_multiple(size: float, patch: int) -> int:
    return max(patch, round(size / patch) * patch)


class ReseededViews(Randomizable):
    """Base of per-sample view transforms that reseed their inner MONAI pipelines on every call.

    The per-call seed comes from ``self.R`` once :meth:`set_random_state` has been called (the crop
    dataset seeds a ``Randomizable`` transform from ``(seed, index)`` before each sample, so views do
    not depend on the number of workers), else from torch's RNG (differently seeded in each
    DataLoader worker; reproducible under ``torch.manual_seed``).
    """

    _seeded = False

    def set_random_state(
        self, seed: int | None = None, state: np.random.RandomState | None = None
    ) -> ReseededViews:
        super().set_random_state(seed, state)
        self._seeded = True
        return self

    def randomize(self, data: Any = None) -> None:
        """Nothing to draw up front: the inner pipelines draw their own parameters."""

    def call_seed(self) -> int:
        if self._seeded:
            return int(self.R.randint(0, 2**31 - 1))
        return int(torch.randint(0, 2**31 - 1, (1,)))


class MultiCropViews(ReseededViews):
    """Per-sample DINO multi-crop: ``{"image": (C, *S)}`` -> global and local crops.

    Output (collatable by ``default_collate``):
        ``global_crops``: ``(2, C, *G)``; ``local_crops``: ``(n_local, C, *L)`` (``n_local`` may be 0).

    Seeding: see :class:`ReseededViews`. See :class:`DINO` for the arguments.
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
        self._pipelines: dict[tuple[int, ...], list[Compose]] = {}

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
                    [override(f"objective.{name}_crop_size", round_up(size, p))],
                )
        return tuple(glob), tuple(loc)

    def _pipeline(
        self, size: Sequence[int], scale: Sequence[float], blur_prob: float, solarize: float
    ) -> Compose:
        nd = self.spatial_dims
        key = "image"
        sigma = tuple(s * min(size) / 224 for s in self.blur_sigma)
        transforms: list[Any] = [
            RandScaleCropd(
                key, roi_scale=scale[0] ** (1 / nd), max_roi_scale=scale[1] ** (1 / nd), random_size=True
            ),
            Resized(key, spatial_size=tuple(size), mode="bilinear" if nd == 2 else "trilinear"),
        ]
        transforms += [RandFlipd(key, prob=self.flip_prob, spatial_axis=a) for a in self.flip_axes]
        if self.jitter_prob > 0:
            transforms += [
                RandScaleIntensityd(key, factors=self.brightness, prob=self.jitter_prob),
                RandScaleIntensityFixedMeand(key, factors=self.contrast, prob=self.jitter_prob),
            ]
        if blur_prob > 0:
            transforms.append(RandGaussianBlurd(key, sigma_range=sigma, prob=blur_prob))
        if solarize > 0:
            transforms.append(RandSolarized(key, prob=solarize))
        transforms.append(Lambdad(key, func=_clamp01))
        return Compose(transforms)

    def _pipelines_for(self, spatial_shape: tuple[int, ...]) -> list[Compose]:
        if spatial_shape not in self._pipelines:
            glob, loc = self.crop_sizes(spatial_shape)
            self._pipelines[spatial_shape] = [
                self._pipeline(glob, self.global_crop_scale, 1.0, 0.0),
                self._pipeline(glob, self.global_crop_scale, 0.1, self.solarize_prob),
                self._pipeline(loc, self.local_crop_scale, 0.5, 0.0),
            ]
        return self._pipelines[spatial_shape]

    def __call__(self, sample: Sample) -> Sample:
        image = torch.as_tensor(sample["image"], dtype=torch.float32)
        g1, g2, loc = self._pipelines_for(tuple(image.shape[1:]))
        seed = self.call_seed()
        for i, pipe in enumerate((g1, g2, loc)):
            pipe.set_random_state(seed=seed + i)

        def run(pipe: Compose) -> Tensor:
            out = pipe({"image": image})["image"]
            return torch.as_tensor(out.as_tensor() if hasattr(out, "as_tensor") else out, dtype=torch.float32)

        glob = torch.stack([run(g1), run(g2)])
        _, loc_size = self.crop_sizes(image.shape[1:])
        if self.n_local_crops:
            local = torch.stack([run(loc) for _ in range(self.n_local_crops)])
        else:
            local = image.new_zeros((0, image.shape[0], *loc_size))
        out = {k: v for k, v in sample.items() if k != "image"}
        out.update(global_crops=glob.contiguous(), local_crops=local.contiguous())
        return out
