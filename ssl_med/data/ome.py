"""OME-Zarr (NGFF) 0.5 metadata for the images of an ssl_med store.

Every image is an NGFF 0.5 image group (zarr v3; all OME metadata under the ``ome`` key of the
group attributes) with one resolution level ``0`` of shape ``(C, Z, Y, X)`` or ``(C, Y, X)``, so the
images open in napari (napari-ome-zarr), ome-zarr-py and other NGFF 0.5 readers. Label maps are NGFF
label images in the image's ``labels/`` group. NGFF before 0.6 has no rotation or affine: volumes are
reoriented at ingest and the original affine is kept in ssl_med's own attributes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

NGFF_VERSION = "0.5"
LEVEL0 = "0"
CHANNEL_COLORS = ("FF0000", "00FF00", "0000FF", "FFFF00", "FF00FF", "00FFFF", "FFFFFF")


def axes(spatial_dims: int, unit: str) -> list[dict[str, str]]:
    """NGFF axes ``c, (z,) y, x``: one channel axis, then space axes with ``unit`` (omitted if ``""``)."""
    names = ("z", "y", "x")[3 - spatial_dims :]
    space = [{"name": n, "type": "space", **({"unit": unit} if unit else {})} for n in names]
    return [{"name": "c", "type": "channel"}, *space]


def dimension_names(spatial_dims: int) -> list[str]:
    """Zarr v3 ``dimension_names`` of a level array (required by NGFF 0.5.2)."""
    return [a["name"] for a in axes(spatial_dims, "")]


def multiscales(
    name: str, spacing: Sequence[float], origin: Sequence[float] | None, unit: str
) -> list[dict[str, Any]]:
    """The ``multiscales`` list of a single-level image: ``scale`` (1 for ``c``) and ``translation``."""
    transforms: list[dict[str, Any]] = [{"type": "scale", "scale": [1.0, *(float(s) for s in spacing)]}]
    if origin is not None and any(origin):
        transforms.append({"type": "translation", "translation": [0.0, *(float(o) for o in origin)]})
    return [
        {
            "name": name,
            "axes": axes(len(spacing), unit),
            "datasets": [{"path": LEVEL0, "coordinateTransformations": transforms}],
        }
    ]


def image_attrs(
    name: str,
    spacing: Sequence[float],
    origin: Sequence[float] | None,
    unit: str,
    channel_names: Sequence[str],
    windows: Sequence[tuple[float, float]],
) -> dict[str, Any]:
    """``{"ome": ...}`` attributes of an image group, with ``omero`` channel labels and display windows."""
    colors = CHANNEL_COLORS if len(channel_names) > 1 else ("FFFFFF",)
    channels = [
        {
            "label": label,
            "color": colors[i % len(colors)],
            "active": True,
            "window": {"start": lo, "end": hi, "min": lo, "max": hi},
        }
        for i, (label, (lo, hi)) in enumerate(zip(channel_names, windows))
    ]
    return {
        "ome": {
            "version": NGFF_VERSION,
            "multiscales": multiscales(name, spacing, origin, unit),
            "omero": {"channels": channels},
        }
    }


def labels_group_attrs(label_names: Sequence[str]) -> dict[str, Any]:
    """``{"ome": {"labels": [...]}}`` of an image's ``labels/`` group."""
    return {"ome": {"version": NGFF_VERSION, "labels": list(label_names)}}


def label_image_attrs(
    name: str, spacing: Sequence[float], origin: Sequence[float] | None, unit: str, values: Sequence[int]
) -> dict[str, Any]:
    """``{"ome": ...}`` of one label image: multiscales plus ``image-label`` (its label values)."""
    return {
        "ome": {
            "version": NGFF_VERSION,
            "multiscales": multiscales(name, spacing, origin, unit),
            "image-label": {"version": NGFF_VERSION, "properties": [{"label-value": int(v)} for v in values]},
        }
    }


def check_image_attrs(attrs: dict[str, Any], shape: Sequence[int]) -> list[str]:
    """Problems with the NGFF metadata of an image group whose level-0 array has ``shape``."""
    ome = attrs.get("ome")
    if not isinstance(ome, dict):
        return ["no 'ome' attributes"]
    problems = []
    if ome.get("version") != NGFF_VERSION:
        problems.append(f"ome.version is {ome.get('version')!r}, expected {NGFF_VERSION!r}")
    try:
        ms = ome["multiscales"][0]
        if len(ms["axes"]) != len(shape):
            problems.append(f"{len(ms['axes'])} axes for a {len(shape)}-d array")
        scale = ms["datasets"][0]["coordinateTransformations"][0]["scale"]
        if len(scale) != len(shape):
            problems.append(f"scale {scale} does not match a {len(shape)}-d array")
    except (KeyError, IndexError, TypeError) as exc:
        problems.append(f"malformed multiscales ({exc!r})")
    return problems
