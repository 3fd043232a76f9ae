"""MedMNIST ``.npz`` files (2D and 3D, MedMNIST+ sizes): every split becomes one stack with its labels."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ssl_med.data.channels import GRAY
from ssl_med.data.readers.base import ReadError, Source, StackRecord

SPLITS = ("train", "val", "test")


def row_name(source_name: str, split: str, index: int) -> str:
    """The image name of row ``index`` of ``split`` of the MedMNIST source named ``source_name``."""
    return f"{source_name}_{split}_{index:05d}"


def is_medmnist(path: str | Path) -> bool:
    try:
        with np.load(path) as z:
            return any(f"{s}_images" in z.files for s in SPLITS)
    except Exception:
        return False


def _as_stack(images: np.ndarray, name: str) -> tuple[np.ndarray, tuple[str, ...]]:
    """``(N, C, *spatial)`` from MedMNIST's ``(N, H, W)``, ``(N, H, W, 3)`` or ``(N, D, H, W)``."""
    if images.ndim == 3:
        return images[:, None], (GRAY,)
    if images.ndim == 4 and images.shape[-1] == 3 and images.shape[1] != 3:
        return np.moveaxis(images, -1, 1), ("R", "G", "B")
    if images.ndim == 4:
        return images[:, None], (GRAY,)
    raise ReadError(f"{name}: unexpected image array shape {images.shape}")


def read_medmnist(source: Source) -> Iterator[StackRecord]:
    path = Path(source.paths[0])
    if path.stat().st_size == 0:
        raise ReadError("zero-size file")
    with np.load(path) as z:
        splits = [s for s in SPLITS if f"{s}_images" in z.files]
        if not splits:
            raise ReadError("not a MedMNIST file (no train_images/val_images/test_images)")
        for split in splits:
            images, chans = _as_stack(z[f"{split}_images"], f"{split}_images")
            labels = z[f"{split}_labels"] if f"{split}_labels" in z.files else None
            if labels is not None and len(labels) != len(images):
                raise ReadError(f"{split}: {len(images)} images but {len(labels)} labels")
            n = len(images)
            yield StackRecord(
                name=f"{source.name}_{split}",
                images=np.ascontiguousarray(images),
                names=[row_name(source.name, split, i) for i in range(n)],
                labels=[] if labels is None else [[int(v) for v in np.atleast_1d(row)] for row in labels],
                split=split,
                spacing=(1.0,) * (images.ndim - 2),
                channel_names=chans,
                source=str(path),
                extra={"dataset": source.name},
            )
