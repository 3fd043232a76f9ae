"""What a MedMNIST-style ``.npz`` holds, and the ``eval_data=medmnist`` fields it fills in.

A MedMNIST-style file has the arrays ``{train,val,test}_images`` and ``{train,val,test}_labels``:

* images ``uint8`` ``(N, H, W)`` (2D grey), ``(N, H, W, 3)`` (2D RGB), ``(N, D, H, W)`` (3D) or
  ``(N, D, H, W, C)`` (3D, channels last); ``(N, H, W, C)`` with another ``C`` is 2D with ``C``
  channels when ``eval_data.channel_names`` names ``C`` channels (e.g. MRI sequences), else 3D grey;
* labels ``(N, 1)`` class ids ``0 .. K-1`` (``(N,)`` is read the same way), or ``(N, L)`` with
  ``L > 1`` and values in ``{0, 1}`` (multi-label).

The task is read from the labels of all three splits: ``(N, 1)`` with two values -> ``binary``, more
-> ``multi-class``; ``(N, L > 1)`` {0, 1} -> ``multi-label``. The spatial dimensionality comes from
the image array rank (read from the ``.npy`` headers, so the images are not decompressed).
:func:`resolve_medmnist` fills the ``task``, ``spatial_dims`` and ``image_size`` fields a config
leaves ``null`` and rejects explicit values the file contradicts (and ``channel_names`` of another
length than the file's channels).
"""

from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import OmegaConf

TASKS = ("binary", "multi-class", "multi-label")
SPLITS = ("train", "val", "test")
IMAGE_SIZE_MULTIPLE = 16  # default resize target: the file's side rounded up to a multiple of this


def _register_resolvers() -> None:
    """``${ssl_med.stem:PATH}``: the file name of ``PATH`` without its suffix (``/x/foo.npz`` -> ``foo``)."""
    if not OmegaConf.has_resolver("ssl_med.stem"):
        OmegaConf.register_new_resolver("ssl_med.stem", lambda path: Path(str(path)).stem)


_register_resolvers()


@dataclass(frozen=True)
class MedmnistLayout:
    """The layout of one MedMNIST-style file.

    Attributes:
        task: ``binary``, ``multi-class`` or ``multi-label``.
        num_classes: classes ``K`` (single-label) or labels ``L`` (multi-label).
        spatial_dims: 2 or 3.
        channels: image channels (1 for grey, 3 for RGB).
        shape: spatial shape of one image, ``(H, W)`` or ``(D, H, W)``.
    """

    task: str
    num_classes: int
    spatial_dims: int
    channels: int
    shape: tuple[int, ...]


def check_task(task: Any, allow_null: bool = False) -> None:
    """Raise a ``ValueError`` naming ``eval_data.task`` and the valid choices unless ``task`` is one of them."""
    if task is None and allow_null:
        return
    if task not in TASKS:
        hint = " (or null: read it from the labels)" if allow_null else ""
        raise ValueError(f"eval_data.task={task!r} is not valid; choose one of {', '.join(TASKS)}{hint}")


def npz_shapes(path: str | Path) -> dict[str, tuple[int, ...]]:
    """``{array name: shape}`` of every array in an ``.npz``, read from the ``.npy`` headers only."""
    shapes = {}
    with zipfile.ZipFile(path) as archive:
        for member in archive.namelist():
            if not member.endswith(".npy"):
                continue
            with archive.open(member) as f:
                version = np.lib.format.read_magic(f)
                reader = (
                    np.lib.format.read_array_header_1_0
                    if version == (1, 0)
                    else np.lib.format.read_array_header_2_0
                )
                shapes[member[: -len(".npy")]] = tuple(reader(f)[0])
    return shapes


def image_layout(shape: tuple[int, ...], channels: int | None = None) -> tuple[int, int]:
    """``(spatial_dims, channels)`` of an image array ``(N, *rest)``.

    ``(N, H, W)`` -> 2D grey; ``(N, H, W, C)`` with ``C`` in {1, 3}, or ``C == channels`` (the number
    of configured channel names), -> 2D with channels last; any other rank-4 array ``(N, D, H, W)`` ->
    3D grey; ``(N, D, H, W, C)`` -> 3D with channels last.
    """
    rest = shape[1:]
    if len(rest) == 2:
        return 2, 1
    if len(rest) == 3:
        return (2, rest[-1]) if rest[-1] in (1, 3) or rest[-1] == channels else (3, 1)
    if len(rest) == 4:
        return 3, rest[-1]
    raise ValueError(f"image arrays must be (N, H, W[, C]) or (N, D, H, W[, C]), got {shape}")


def infer_task(labels: np.ndarray) -> tuple[str, int]:
    """``(task, num_classes)`` from labels ``(N,)``/``(N, 1)`` class ids or ``(N, L)`` {0, 1} flags."""
    labels = labels.reshape(len(labels), -1)
    if not np.array_equal(labels, np.round(labels)):
        raise ValueError("labels must be integers (class ids or {0, 1} flags)")
    values = np.unique(labels).astype(np.int64)
    if labels.shape[1] > 1:
        if not set(values.tolist()) <= {0, 1}:
            raise ValueError(
                f"labels of shape (N, {labels.shape[1]}) must be multi-label {{0, 1}} flags, "
                f"found values {values[:10].tolist()}"
            )
        return "multi-label", labels.shape[1]
    if values.min() < 0 or len(values) < 2:
        raise ValueError(f"class ids must be >= 0 with at least two classes, found {values[:10].tolist()}")
    if len(values) == 2:
        if values.tolist() != [0, 1]:
            raise ValueError(f"two-class labels must be 0 and 1, found {values.tolist()}")
        return "binary", 2
    return "multi-class", int(values.max()) + 1


def inspect_medmnist(path: str | Path, channels: int | None = None) -> MedmnistLayout:
    """Read the task, class count and image layout of a MedMNIST-style ``.npz`` (labels of all splits);
    ``channels``: the number of configured channel names (:func:`image_layout`)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found (eval_data.path); see ../shared/data/README.md")
    shapes = npz_shapes(path)
    missing = [f"{s}_{kind}" for s in SPLITS for kind in ("images", "labels") if f"{s}_{kind}" not in shapes]
    if missing:
        raise ValueError(f"{path} lacks the MedMNIST arrays {missing} (has {sorted(shapes)})")
    layouts = {image_layout(shapes[f"{s}_images"], channels) for s in SPLITS}
    if len(layouts) > 1:
        raise ValueError(f"{path}: the splits' image arrays disagree in layout {sorted(layouts)}")
    spatial_dims, channels = layouts.pop()
    with np.load(path) as arrays:
        per_split = [arrays[f"{s}_labels"] for s in SPLITS]
    labels = np.concatenate([y.reshape(len(y), -1) for y in per_split])  # (N_all, L)
    task, num_classes = infer_task(labels)
    shape = shapes["train_images"][1 : 1 + spatial_dims]
    return MedmnistLayout(task, num_classes, spatial_dims, channels, shape)


def _check_explicit_task(task: str, layout: MedmnistLayout) -> None:
    """Reject a configured task the labels cannot carry (``binary`` vs ``multi-class`` on 2 classes is fine)."""
    if (task == "multi-label") != (layout.task == "multi-label") or (
        task == "binary" and layout.num_classes > 2
    ):
        raise ValueError(
            f"eval_data.task={task!r} does not fit the labels, which read as {layout.task} with "
            f"{layout.num_classes} {'labels' if layout.task == 'multi-label' else 'classes'}; "
            "set eval_data.task=null to use the file's"
        )


def resolve_medmnist(cfg: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``cfg`` with ``task``, ``spatial_dims`` and ``image_size`` read from ``cfg['path']`` when null.

    ``image_size`` defaults to the file's largest side rounded up to a multiple of 16 (28 -> 32,
    64 -> 64). Explicit values the file contradicts raise a ``ValueError``.
    """
    check_task(cfg.get("task"), allow_null=True)
    names = cfg.get("channel_names")
    layout = inspect_medmnist(cfg["path"], len(names) if names else None)
    if names and len(names) != layout.channels:
        raise ValueError(
            f"eval_data.channel_names={list(names)} names {len(names)} channels but {cfg['path']} holds "
            f"{layout.channels}-channel {layout.spatial_dims}D images {layout.shape} (channels come last: "
            "(N, H, W, C) or (N, D, H, W, C))"
        )
    out = dict(cfg)
    if out.get("task") is None:
        out["task"] = layout.task
    else:
        _check_explicit_task(out["task"], layout)
    if out.get("spatial_dims") is None:
        out["spatial_dims"] = layout.spatial_dims
    elif int(out["spatial_dims"]) != layout.spatial_dims:
        raise ValueError(
            f"eval_data.spatial_dims={out['spatial_dims']} but {cfg['path']} holds {layout.spatial_dims}D images "
            f"{layout.shape}; set eval_data.spatial_dims=null to use the file's"
        )
    if out.get("image_size") is None:
        out["image_size"] = math.ceil(max(layout.shape) / IMAGE_SIZE_MULTIPLE) * IMAGE_SIZE_MULTIPLE
    return out
