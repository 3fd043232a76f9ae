"""View geometry: which data crops an objective can train on, decided before anything is built.

The data module samples crops ``(C, *S)``; the objective turns each into views (MAE: the crop itself,
DINO: global and local crops, VoCo: base and random crops of a region, graph matching: two resized
copies) and the encoder cuts every view into patches. Each objective declares what it needs through
:meth:`ssl_med.objective.Objective.view_geometry`, a classmethod that takes a :class:`CropSpec` and
the objective's options and returns a :class:`ViewGeometry` or raises a :class:`GeometryError` that
names the override fixing it::

    geometry = VoCo.view_geometry(CropSpec((32, 96, 96), (8, 8, 8)), {"grid": [3, 3]})
    geometry.encoder_size                     # (32, 32, 32): what backbone.img_size should be
    VoCo.view_geometry(CropSpec((64, 64), (8, 8)), {"grid": [3, 3]})
    # GeometryError: ... not divisible by the grid (3, 3); fix: data.crop_size=[72,72]

``ssl_med pretrain`` runs it right after parsing the config (:mod:`ssl_med.train.geometry`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ssl_med.config import ConfigError

Size = tuple[int, ...]


@dataclass(frozen=True)
class CropSpec:
    """The data side of the geometry (``data`` group, and the backbone's patch).

    Attributes:
        crop_size: ``S`` of the data crops, ``(H, W)`` or ``(D, H, W)``.
        patch_size: the encoder's patch, one value per spatial axis.
        batch_size: crops per batch.
    """

    crop_size: Size
    patch_size: Size
    batch_size: int = 2

    @property
    def spatial_dims(self) -> int:
        return len(self.crop_size)


@dataclass(frozen=True)
class ViewGeometry:
    """What an objective feeds the encoder.

    Attributes:
        encoder_size: ``S`` the encoder's position table is made for (``backbone.img_size``): the
            largest views (the crop for MAE, DINO's global crops, VoCo's base crops).
        views: spatial size of each kind of view, by name (``{"global": (64, 64), "local": (24, 24)}``).
    """

    encoder_size: Size
    views: dict[str, Size] = field(default_factory=dict)

    def describe(self) -> str:
        """``"global 64x64, local 24x24"``."""
        return ", ".join(f"{name} {format_size(size)}" for name, size in self.views.items())


class GeometryError(ConfigError):
    """Data crops (or view options) that an objective cannot train on.

    Args:
        reason: what does not fit.
        fixes: alternative overrides that each fix it (``["data.crop_size=[72,72]", "objective.grid=[2,2]"]``).
        crop_size: the nearest data crop size that fits, when changing the crop fixes it; start-up
            uses it in place of a default crop the user did not choose.
    """

    def __init__(
        self, reason: str, fixes: Sequence[str] = (), crop_size: Sequence[int] | None = None
    ) -> None:
        self.reason = reason
        self.fixes = tuple(fixes)
        self.crop_size = tuple(int(s) for s in crop_size) if crop_size is not None else None
        super().__init__(f"{reason}; fix: {' or '.join(self.fixes)}" if self.fixes else reason)


def format_size(size: Sequence[int]) -> str:
    """``(32, 96, 96) -> "32x96x96"``."""
    return "x".join(str(int(s)) for s in size)


def override(key: str, value: Any) -> str:
    """A command-line override: ``override("data.crop_size", (72, 72)) == "data.crop_size=[72,72]"``."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        value = "[" + ",".join(str(v) for v in value) + "]"
    return f"{key}={value}"


def round_up(size: Sequence[int], multiple: Sequence[int]) -> Size:
    """Each axis rounded up to a multiple: ``round_up((64, 60), (24, 8)) == (72, 64)``."""
    return tuple(-(-int(s) // int(m)) * int(m) for s, m in zip(size, multiple, strict=True))


def crop_misfit(reason: str, fitting_crop: Sequence[int], *alternatives: str) -> GeometryError:
    """A :class:`GeometryError` fixed by ``data.crop_size=<fitting_crop>`` (or by ``alternatives``)."""
    return GeometryError(reason, (override("data.crop_size", fitting_crop), *alternatives), fitting_crop)


def patch_multiple_crop(crop: CropSpec) -> Size:
    """The crop size, checked to be a multiple of the patch (every encoder input must be)."""
    fit = round_up(crop.crop_size, crop.patch_size)
    if fit != tuple(crop.crop_size):
        raise crop_misfit(
            f"data crop {format_size(crop.crop_size)} is not a multiple of the patch size {format_size(crop.patch_size)}",
            fit,
        )
    return tuple(crop.crop_size)
