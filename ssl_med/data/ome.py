"""OME-Zarr (NGFF) 0.5 metadata for the images of an ssl_med store.

Every image is an NGFF 0.5 image group (zarr v3; all OME metadata under the ``ome`` key of the
group attributes) whose level ``0`` holds the data, ``(C, Z, Y, X)`` or ``(C, Y, X)``, optionally
followed by downsampled levels ``1, 2, ...`` for viewers (:mod:`ssl_med.data.pyramid`), so the images
open in napari (napari-ome-zarr), ome-zarr-py and other NGFF 0.5 readers. Label maps are NGFF label
images in the image's ``labels/`` group, pointing back at their image (``image-label.source``).

The store root is an NGFF 0.5 collection in the ``bioformats2raw.layout`` form, the one collection of
images NGFF 0.5 defines: the root carries ``"bioformats2raw.layout": 3`` and its ``OME`` group lists
the image groups (``series``: ``images/<name>``). The ``stacks/`` arrays (many small images packed in
one array) are ssl_med's own and not NGFF images; a store holding only stacks has no image to list,
so its root stays a plain zarr group. NGFF before 0.6 has no rotation or affine: volumes are
reoriented at ingest and the original affine is kept in ssl_med's own attributes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

NGFF_VERSION = "0.5"
LEVEL0 = "0"
CHANNEL_COLORS = ("FF0000", "00FF00", "0000FF", "FFFF00", "FF00FF", "00FFFF", "FFFFFF")
LABEL_COLORS = ("E6194B", "3CB44B", "4363D8", "FFE119", "F58231", "911EB4", "42D4F4", "F032E6")
OME_GROUP = "OME"  # the root group listing the collection's images (``series``)


def axes(spatial_dims: int, unit: str) -> list[dict[str, str]]:
    """NGFF axes ``c, (z,) y, x``: one channel axis, then space axes with ``unit`` (omitted if ``""``)."""
    names = ("z", "y", "x")[3 - spatial_dims :]
    space = [{"name": n, "type": "space", **({"unit": unit} if unit else {})} for n in names]
    return [{"name": "c", "type": "channel"}, *space]


def dimension_names(spatial_dims: int) -> list[str]:
    """Zarr v3 ``dimension_names`` of a level array (required by NGFF 0.5.2)."""
    return [a["name"] for a in axes(spatial_dims, "")]


def level_transforms(
    spacing: Sequence[float], origin: Sequence[float] | None, factors: Sequence[int], averaged: bool = True
) -> list[dict[str, Any]]:
    """``scale`` (1 for ``c``) and ``translation`` of a level downsampled by ``factors`` per spatial
    axis: its voxels are ``factors`` times larger; averaged blocks have their centre half the extra
    size further on, while strided levels (label maps) keep the centre of their first voxel."""
    scale = [float(s) * f for s, f in zip(spacing, factors)]
    shift = [(0.0 if origin is None else float(o)) + (f - 1) * float(s) / 2 * averaged
             for o, s, f in zip(origin or [0.0] * len(spacing), spacing, factors)]  # fmt: skip
    transforms: list[dict[str, Any]] = [{"type": "scale", "scale": [1.0, *scale]}]
    if any(shift):
        transforms.append({"type": "translation", "translation": [0.0, *shift]})
    return transforms


def multiscales(
    name: str,
    spacing: Sequence[float],
    origin: Sequence[float] | None,
    unit: str,
    levels: Sequence[Sequence[int]] = (),
    averaged: bool = True,
) -> list[dict[str, Any]]:
    """The ``multiscales`` list of an image: level ``0``, then one dataset ``k`` per entry of ``levels``
    (cumulative downsampling factors per spatial axis, :func:`ssl_med.data.pyramid.plan`; block means
    when ``averaged``, strided otherwise)."""
    all_factors = [(1,) * len(spacing), *(tuple(f) for f in levels)]
    datasets = [
        {"path": str(k), "coordinateTransformations": level_transforms(spacing, origin, f, averaged)}
        for k, f in enumerate(all_factors)
    ]
    return [{"name": name, "axes": axes(len(spacing), unit), "datasets": datasets}]


def level_factors(attrs: dict[str, Any], spacing: Sequence[float]) -> list[tuple[int, ...]]:
    """Downsampling factors of the levels after ``0`` listed in an image group's ``attrs`` (``[]`` for a
    single-level image or one without NGFF metadata)."""
    try:
        datasets = attrs["ome"]["multiscales"][0]["datasets"]
    except (KeyError, IndexError, TypeError):
        return []
    factors = []
    for ds in datasets[1:]:
        scale = ds["coordinateTransformations"][0]["scale"][1:]
        factors.append(tuple(max(1, round(float(a) / float(s))) for a, s in zip(scale, spacing)))
    return factors


def image_attrs(
    name: str,
    spacing: Sequence[float],
    origin: Sequence[float] | None,
    unit: str,
    channel_names: Sequence[str],
    windows: Sequence[tuple[float, float]],
    levels: Sequence[Sequence[int]] = (),
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
            "multiscales": multiscales(name, spacing, origin, unit, levels),
            "omero": {"channels": channels},
        }
    }


def labels_group_attrs(label_names: Sequence[str]) -> dict[str, Any]:
    """``{"ome": {"labels": [...]}}`` of an image's ``labels/`` group."""
    return {"ome": {"version": NGFF_VERSION, "labels": list(label_names)}}


def label_color(value: int) -> list[int]:
    """RGBA display colour of label ``value``: transparent background (0), then a fixed palette."""
    if value == 0:
        return [0, 0, 0, 0]
    rgb = LABEL_COLORS[(value - 1) % len(LABEL_COLORS)]
    return [int(rgb[i : i + 2], 16) for i in (0, 2, 4)] + [255]


def label_image_attrs(
    name: str,
    spacing: Sequence[float],
    origin: Sequence[float] | None,
    unit: str,
    values: Sequence[int],
    levels: Sequence[Sequence[int]] = (),
) -> dict[str, Any]:
    """``{"ome": ...}`` of one label image in ``<image>/labels/<name>``: multiscales plus ``image-label``
    with its label values, their colours and its ``source`` (the image two groups up)."""
    return {
        "ome": {
            "version": NGFF_VERSION,
            "multiscales": multiscales(name, spacing, origin, unit, levels, averaged=False),
            "image-label": {
                "version": NGFF_VERSION,
                "colors": [{"label-value": int(v), "rgba": label_color(int(v))} for v in values],
                "properties": [{"label-value": int(v)} for v in values],
                "source": {"image": "../../"},
            },
        }
    }


def collection_attrs() -> dict[str, Any]:
    """``{"ome": ...}`` of the store root: the ``bioformats2raw.layout`` collection marker."""
    return {"ome": {"version": NGFF_VERSION, "bioformats2raw.layout": 3}}


def series_attrs(image_paths: Sequence[str]) -> dict[str, Any]:
    """``{"ome": ...}`` of the root's ``OME`` group: the paths of the collection's image groups."""
    return {"ome": {"version": NGFF_VERSION, "series": list(image_paths)}}


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
        for ds in ms["datasets"]:
            scale = ds["coordinateTransformations"][0]["scale"]
            if len(scale) != len(shape):
                problems.append(f"level {ds['path']}: scale {scale} does not match a {len(shape)}-d array")
    except (KeyError, IndexError, TypeError) as exc:
        problems.append(f"malformed multiscales ({exc!r})")
    return problems
