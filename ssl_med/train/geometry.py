"""Start-up view geometry of ``ssl_med pretrain``: fit the data crop and the backbone to the objective.

Runs right after the config is parsed, before anything is built (:func:`prepare_pretrain_config`):

1. the objective's :meth:`~ssl_med.objective.Objective.view_geometry` checks the data crop. A crop
   that does not fit is replaced by the nearest one that does (with a log line) when the user did not
   choose it (no ``data=`` or ``data.crop_size=`` override); otherwise start-up fails with a
   :class:`~ssl_med.geometry.GeometryError` naming the override that fixes it.
2. ``backbone.img_size`` becomes the size of the views the encoder sees (VoCo's base crops, DINO's
   global crops) when it follows ``data.crop_size`` by interpolation, as the backbone configs do.

Which data an objective trains on by default is the objective config's business: ``conf/objective/
voco.yaml`` overrides the data group with ``demo3d_voco`` (a command-line ``data=`` still wins).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from omegaconf import DictConfig, OmegaConf

from ssl_med.config import PretrainConfig, parse_pretrain_config
from ssl_med.geometry import CropSpec, GeometryError, ViewGeometry, format_size, override
from ssl_med.registry import OBJECTIVES
from ssl_med.utils import to_tuple

log = logging.getLogger(__name__)

#: command-line override keys by which the user chooses the data crop
CROP_CHOICES = ("data", "data.crop_size")
#: the backbone configs' ``img_size``, following the data crop
FOLLOWS_CROP = "${data.crop_size}"


def crop_spec(cfg: PretrainConfig) -> CropSpec:
    """The data crop of ``cfg`` with the backbone's patch (``backbone.patch_size``, else ``data.patch_size``).

    Raises:
        GeometryError: ``data.crop_size`` does not have ``data.spatial_dims`` values.
    """
    crop = tuple(int(s) for s in cfg.data.crop_size)
    if len(crop) != cfg.data.spatial_dims:
        raise GeometryError(
            f"data.crop_size={list(crop)} has {len(crop)} values but data.spatial_dims={cfg.data.spatial_dims} "
            f"(data={cfg.data.name})",
            [override("data.spatial_dims", len(crop))],
        )
    patch = to_tuple(cfg.backbone.get("patch_size") or cfg.data.patch_size, len(crop))
    return CropSpec(crop, tuple(int(p) for p in patch), cfg.data.batch_size)


def view_geometry(cfg: PretrainConfig) -> ViewGeometry:
    """The views ``cfg.objective`` makes of ``cfg.data``'s crops; raises :class:`GeometryError` if they do not fit."""
    objective = OBJECTIVES.get(cfg.objective["name"])
    return objective.view_geometry(crop_spec(cfg), cfg.objective)


def chooses_crop(overrides: Sequence[str]) -> bool:
    """Whether command-line ``overrides`` choose the data crop (``data=...``, ``data.crop_size=...``)."""
    keys = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    return any(key in CROP_CHOICES for key in keys)


def img_size_follows_crop(raw: DictConfig) -> bool:
    """Whether the composed (unresolved) config's ``backbone.img_size`` is ``${data.crop_size}``."""
    backbone = OmegaConf.to_container(raw.backbone, resolve=False)
    value = backbone.get("img_size") if isinstance(backbone, dict) else None
    return isinstance(value, str) and value.replace(" ", "") == FOLLOWS_CROP


def fit_geometry(cfg: PretrainConfig, crop_chosen: bool, img_size_follows: bool) -> ViewGeometry:
    """Check ``cfg``'s view geometry and adapt ``cfg`` in place (see the module docstring).

    Args:
        cfg: the parsed config; ``data.crop_size`` and ``backbone["img_size"]`` may change.
        crop_chosen: the user chose the crop, so a misfit is an error rather than adapted.
        img_size_follows: ``backbone.img_size`` follows the crop and should follow the views instead.
    """
    name = cfg.objective["name"]
    try:
        geometry = view_geometry(cfg)
    except GeometryError as err:
        if crop_chosen or err.crop_size is None:
            raise GeometryError(
                f"objective={name} does not fit data={cfg.data.name}: {err.reason}", err.fixes
            ) from None
        log.info(
            "data.crop_size %s -> %s to fit objective=%s (%s); set data.crop_size to choose another",
            format_size(cfg.data.crop_size),
            format_size(err.crop_size),
            name,
            err.reason,
        )
        cfg.data.crop_size = list(err.crop_size)
        geometry = view_geometry(cfg)
    if img_size_follows and "img_size" in cfg.backbone:
        cfg.backbone["img_size"] = list(geometry.encoder_size)
    log.info(
        "objective=%s on data=%s: crops %s -> views %s; backbone.img_size %s",
        name, cfg.data.name, format_size(cfg.data.crop_size), geometry.describe(),
        format_size(cfg.backbone.get("img_size") or geometry.encoder_size),
    )  # fmt: skip
    return geometry


def prepare_pretrain_config(raw: DictConfig, overrides: Sequence[str] = ()) -> PretrainConfig:
    """Parse a composed ``pretrain`` config and fit its view geometry, before anything is built.

    Args:
        raw: the composed Hydra config (unresolved: ``backbone.img_size`` may still be an interpolation).
        overrides: the command-line overrides it was composed with (``HydraConfig.get().overrides.task``).

    Raises:
        ConfigError: an invalid config; :class:`GeometryError` when the crops do not fit the objective.
    """
    cfg = parse_pretrain_config(raw)
    fit_geometry(cfg, crop_chosen=chooses_crop(overrides), img_size_follows=img_size_follows_crop(raw))
    return cfg
