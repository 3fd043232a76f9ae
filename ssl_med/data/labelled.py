"""Labelled views of an image store for the evaluators: class labels (MedMNIST) and segmentation masks.

Unlike :class:`~ssl_med.data.crops.RandomCropDataset` these return whole images, in manifest (name)
order, with their labels: ``{"image": (C, *spatial) float32 in [0, 1], "label": ..., "name": str}``
where ``label`` is an ``int64`` tensor of the class label(s) (``task="classification"``) or the
``(1, *spatial)`` ``int64`` label map (``task="segmentation"``).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ssl_med.data.crops import normalise_intensity
from ssl_med.data.store import ImageStore

TASKS = ("classification", "segmentation")


class LabelledImages(Dataset):
    """The labelled images of one split of a store.

    Args:
        store_path: path/URL of the store (opened lazily per process).
        split: only images of this split (``None``: all).
        task: ``"classification"`` (images with a class label) or ``"segmentation"`` (images with
            the label map ``label_map``).
        label_map: name of the label map for segmentation (``"seg"``).
        normalise: scale intensities to ``[0, 1]`` with the stored percentiles (else raw float32).
    """

    def __init__(
        self,
        store_path: str | os.PathLike[str],
        split: str | None = None,
        task: str = "classification",
        label_map: str = "seg",
        normalise: bool = True,
    ) -> None:
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        self.store_path, self.task, self.label_map, self.normalise = (
            str(store_path),
            task,
            label_map,
            normalise,
        )
        manifest = ImageStore(self.store_path).manifest
        self.names = [
            n
            for n, m in manifest.items()
            if (split is None or m.split == split)
            and (m.label is not None if task == "classification" else label_map in m.label_maps)
        ]
        self.metas = [manifest[n] for n in self.names]
        self._store: ImageStore | None = None
        self._pid: int | None = None

    @property
    def store(self) -> ImageStore:
        if self._store is None or self._pid != os.getpid():
            self._store, self._pid = ImageStore(self.store_path), os.getpid()
        return self._store

    def __len__(self) -> int:
        return len(self.names)

    def labels(self) -> np.ndarray:
        """Class labels of all images ``(N, L)`` int64 (classification), read from the manifest only."""
        if self.task != "classification":
            raise ValueError("labels() is for classification views")
        return np.asarray([m.label for m in self.metas], dtype=np.int64).reshape(len(self.metas), -1)

    def __getitem__(self, index: int) -> dict[str, Any]:
        name, meta = self.names[index], self.metas[index]
        image = self.store.read(name)
        image = normalise_intensity(image, meta) if self.normalise else image.astype(np.float32)
        if self.task == "classification":
            label = torch.as_tensor(meta.label, dtype=torch.int64)
        else:
            label = torch.from_numpy(self.store.read_label(name, self.label_map).astype(np.int64))
        return {"image": torch.from_numpy(np.ascontiguousarray(image)), "label": label, "name": name}
