"""Labelled evaluation data, read straight from files (``eval_data=...``).

The evaluation sets are read from their published files, not from an ingested image store: the
MedMNIST ``.npz`` files with numpy, the BraTS case with nibabel, the Kvasir-SEG pairs with Pillow and
the MNI152 tissue maps from nilearn, each prepared the way its benchmark is usually reported.

This is the one loader of labelled data: the evaluators, the online evaluation during pretraining
and the benchmark scripts (through ``ssl_med evaluate``) all read through :func:`load_eval_data`.
An ingested store keeps the labels its files carried (manifest and label maps), but nothing
evaluates from a store. Channel matching is shared with the crops,
:func:`ssl_med.data.crops.match_channels`.

Two kinds of output:

* :class:`ClassificationData` — images ``(N, C, *S)`` float32 in ``[0, 1]`` resized to
  ``image_size``, labels ``(N,)`` int (single-label) or ``(N, L)`` {0, 1} (multi-label), per split.
* :class:`SegmentationData` — per split a list of ``(image (C, *S) float32 in [0, 1], label (*S)
  int64)`` items. 3D tasks give one sub-volume per split (split by location along an axis); 2D
  tasks give slices / photos resized to ``image_size``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ssl_med.data.crops import match_channels
from ssl_med.data.intensity import normalise_intensity
from ssl_med.data.resample import resize
from ssl_med.data.stats import intensity_stats, percentile_window
from ssl_med.evaluators.medmnist import SPLITS, resolve_medmnist


@dataclass
class ClassificationData:
    """Images and labels per split.

    Attributes:
        name: dataset name.
        task: ``binary``, ``multi-class`` or ``multi-label``.
        images: split -> ``(N, C, *S)`` float32 tensor in ``[0, 1]``.
        labels: split -> ``(N,)`` int64 array, or ``(N, L)`` for multi-label.
        num_classes: classes (single-label) or labels (multi-label).
        channel_names: one name per image channel (``eval_data.channel_names``), ``None`` when the
            channels are unnamed or were averaged/repeated to the encoder's channel count; read by
            ``eval.channels`` (:mod:`ssl_med.evaluators.channels`).
        source: the resolved ``eval_data`` config the set was read from (to read it again with every
            channel, for channel-adaptive encoders).
    """

    name: str
    task: str
    images: dict[str, torch.Tensor]
    labels: dict[str, np.ndarray]
    num_classes: int
    channel_names: list[str] | None = None
    source: dict[str, Any] | None = None


@dataclass
class SegmentationData:
    """Segmentation items per split.

    Attributes:
        name: dataset name.
        spatial_dims: 2 or 3.
        items: split -> list of ``(image (C, *S) float32 [0, 1], label (*S) int64)``.
        class_names: foreground class names; label ``i + 1`` is ``class_names[i]``, 0 is background.
        channel_names: one name per image channel (BraTS: ``eval_data.modalities``), ``None`` when
            the channels are unnamed or were averaged to the encoder's channel count; read by
            ``eval.channels`` (:mod:`ssl_med.evaluators.channels`).
        source: the resolved ``eval_data`` config the set was read from (to read it again with every
            channel, for channel-adaptive encoders).
    """

    name: str
    spatial_dims: int
    items: dict[str, list[tuple[np.ndarray, np.ndarray]]]
    class_names: list[str] = field(default_factory=list)
    channel_names: list[str] | None = None
    source: dict[str, Any] | None = None

    @property
    def num_classes(self) -> int:
        """Output channels including background."""
        return len(self.class_names) + 1


# -- helpers ----------------------------------------------------------------------------------------
def percentile_scale(volume: np.ndarray) -> np.ndarray:
    """Scale each channel of ``(C, *S)`` to ``[0, 1]`` by its 0.5/99.5 percentiles over all voxels
    (clipped): the window ``ssl_med ingest`` records for a stored image
    (:func:`ssl_med.data.stats.intensity_stats`) and pretraining scales its crops by
    (``data.intensity_window=image``), so that a frozen encoder reads an evaluation volume on the scale
    it was pretrained on. (Percentiles of the non-zero voxels alone put a skull-stripped MRI on another
    scale: BraTS T1 brain voxels span [123, 518] where the whole volume's window is [0, 489].)"""
    return normalise_intensity(volume, percentile_window(intensity_stats(volume)))


def _subset(n: int, limit: int | None, labels: np.ndarray, seed: int = 0) -> np.ndarray:
    """Sorted indices of a stratified random subset of at most ``limit`` items (all when ``limit`` is None).

    Stratification keeps one item of every class (multi-label: every label combination), which can exceed
    ``limit`` where there are many rare combinations (ChestMNIST's 14 labels); the excess is then dropped at
    random, so ``limit`` always holds."""
    if limit is None or limit >= n:
        return np.arange(n)
    from ssl_med.evaluators.label_efficiency import stratified_subset

    keep = stratified_subset(labels, limit / n, seed=seed)
    if len(keep) > limit:
        keep = np.sort(np.random.default_rng(seed).choice(keep, size=limit, replace=False))
    return keep


# -- classification ---------------------------------------------------------------------------------
def load_medmnist(cfg: dict[str, Any], in_chans: int = 1) -> ClassificationData:
    """A MedMNIST-style ``.npz`` (official splits) resized to ``cfg['image_size']``.

    ``cfg`` keys: ``name``, ``path``, ``task``, ``spatial_dims``, ``image_size`` (int), ``subset``
    (max items per split, stratified, or null), ``channel_names`` (one name per channel of the file, or
    null). ``task``, ``spatial_dims`` and ``image_size`` may be null:
    :func:`ssl_med.evaluators.medmnist.resolve_medmnist` reads them from the file. Grey images
    ``(N, *S)`` and channels-last ones ``(N, *S, C)`` become ``(N, in_chans, *size)`` (``in_chans=None``
    keeps ``C``); the channels keep their names when they are not averaged or repeated.
    """
    cfg = resolve_medmnist(cfg)
    dims = int(cfg["spatial_dims"])
    size = [int(cfg["image_size"])] * dims
    multi_label = cfg["task"] == "multi-label"
    with np.load(cfg["path"]) as arrays:
        raw = {s: (arrays[f"{s}_images"], arrays[f"{s}_labels"]) for s in SPLITS}
    raw = {s: (x, y.reshape(len(y), -1)) for s, (x, y) in raw.items()}  # labels (N, L)
    num_classes = raw["train"][1].shape[1] if multi_label else int(max(y.max() for _, y in raw.values())) + 1
    images, labels = {}, {}
    for split, (x, y) in raw.items():
        y = y if multi_label else y[:, 0]
        keep = _subset(len(x), cfg.get("subset"), y if y.ndim == 1 else y[:, 0])
        x, y = x[keep], y[keep]
        x = x[:, None] if x.ndim == dims + 1 else np.moveaxis(x, -1, 1)  # (N, C, *S)
        x = np.stack([match_channels(item, in_chans) for item in x]) if in_chans not in (None, x.shape[1]) else x
        tensor = torch.from_numpy(np.ascontiguousarray(x)).float() / 255.0
        images[split] = resize(tensor, size).clamp_(0, 1)
        labels[split] = y.astype(np.int64)
    names = configured_channel_names(cfg)
    kept = names is not None and images["train"].shape[1] == len(names)
    return ClassificationData(
        cfg["name"], cfg["task"], images, labels, num_classes, list(names) if kept else None, dict(cfg)
    )


def configured_channel_names(cfg: dict[str, Any]) -> list[str] | None:
    """The channel names an ``eval_data`` config gives, in channel order: ``modalities`` for BraTS (the
    sequences it stacks), ``channel_names`` for the other kinds (MedMNIST-style files); ``None`` when it
    names none."""
    names = cfg.get("modalities") if cfg.get("kind") == "brats" else cfg.get("channel_names")
    return [str(n) for n in names] if names else None


# -- segmentation -----------------------------------------------------------------------------------
def _load_nifti_zyx(path: Path) -> np.ndarray:
    import nibabel as nib

    return np.asarray(nib.load(str(path)).dataobj).transpose(2, 1, 0)  # (X, Y, Z) -> (Z, Y, X)


def _bbox(mask: np.ndarray, margin: int = 0) -> tuple[slice, ...]:
    """Bounding box of ``mask`` ``(*S)`` as slices, grown by ``margin``."""
    idx = np.nonzero(mask)
    return tuple(
        slice(max(int(i.min()) - margin, 0), min(int(i.max()) + 1 + margin, n))
        for i, n in zip(idx, mask.shape)
    )


def split_by_location(
    image: np.ndarray, label: np.ndarray, axis: int, order: list[str], fractions: list[float]
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Cut ``(C, *S)`` / ``(*S)`` into contiguous slabs along spatial ``axis`` over the foreground extent.

    ``order`` names the splits from low to high index and ``fractions`` their share of the
    foreground (label > 0) extent along ``axis``; the first/last slab also take the remainder of
    the volume beyond the foreground.
    """
    profile = (label > 0).sum(axis=tuple(a for a in range(label.ndim) if a != axis))
    nz = np.nonzero(profile)[0]
    lo, hi = int(nz.min()), int(nz.max()) + 1
    cuts = np.round(lo + np.cumsum([0.0, *fractions]) / sum(fractions) * (hi - lo)).astype(int)
    cuts[0], cuts[-1] = 0, label.shape[axis]
    out = {}
    for name, start, stop in zip(order, cuts[:-1], cuts[1:]):
        sl = [slice(None)] * label.ndim
        sl[axis] = slice(int(start), int(stop))
        out[name] = (image[(slice(None), *sl)], label[tuple(sl)])
    return out


def _remap(label: np.ndarray, mapping: dict[int, int]) -> np.ndarray:
    out = np.zeros(label.shape, dtype=np.int64)
    for src, dst in mapping.items():
        out[label == int(src)] = int(dst)
    return out


def _downsample(image: np.ndarray, label: np.ndarray, factor: int) -> tuple[np.ndarray, np.ndarray]:
    """Average-pool ``(C, *S)`` and nearest-subsample ``(*S)`` by ``factor``."""
    if factor <= 1:
        return image, label
    t = torch.from_numpy(image)[None]
    pool = F.avg_pool3d if t.ndim == 5 else F.avg_pool2d
    image = pool(t, factor, ceil_mode=True)[0].numpy()
    sl = tuple(slice(0, None, factor) for _ in range(label.ndim))
    return image, label[sl]


def _volume_task(
    cfg: dict[str, Any], image: np.ndarray, label: np.ndarray, class_names: list[str]
) -> SegmentationData:
    """Shared 3D/2D preparation of one labelled volume ``(C, Z, Y, X)`` / ``(Z, Y, X)``."""
    box = _bbox(image.max(axis=0) > 0, margin=2)
    image, label = image[(slice(None), *box)], label[box]
    image, label = _downsample(image, label, int(cfg.get("downsample", 1)))
    splits = split_by_location(
        image, label, int(cfg["split_axis"]), list(cfg["split_order"]), list(cfg["split_fractions"])
    )
    dims = int(cfg["spatial_dims"])
    items: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
    for split, (img, lab) in splits.items():
        if dims == 3:
            items[split] = [(np.ascontiguousarray(img, dtype=np.float32), np.ascontiguousarray(lab))]
            continue
        axis = int(cfg["split_axis"])
        size = [int(cfg["image_size"])] * 2
        slices = []
        for i in range(lab.shape[axis]):
            lab2 = np.take(lab, i, axis=axis)
            if cfg.get("foreground_slices_only", True) and not lab2.any():
                continue
            img2 = np.take(img, i, axis=axis + 1)
            x = resize(torch.from_numpy(np.ascontiguousarray(img2, dtype=np.float32))[None], size)[0].numpy()
            y = resize(torch.from_numpy(lab2[None, None].astype(np.float32)), size, mode="nearest")[0, 0]
            slices.append((x, y.long().numpy()))
        stride = int(cfg.get("slice_stride", 1))
        items[split] = slices[::stride] if split == "train" else slices
    return SegmentationData(cfg["name"], dims, items, class_names)


def load_brats(cfg: dict[str, Any], in_chans: int | None = 1) -> SegmentationData:
    """The BraTS 2020 case: chosen ``modalities`` stacked as channels, labels remapped by ``label_map``.

    ``cfg`` keys: ``path`` (case folder), ``modalities`` (e.g. ``[flair]``), ``label_map``
    (``{1: 1, 2: 2, 4: 3}``), ``class_names``, ``downsample``, ``split_axis``, ``split_order``,
    ``split_fractions``, ``spatial_dims``, ``image_size`` (2D).
    """
    folder = Path(cfg["path"])
    case = folder.name
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} not found (eval_data.path); see ../shared/data/README.md")
    volume = np.stack([_load_nifti_zyx(folder / f"{case}_{m}.nii.gz") for m in cfg["modalities"]])
    label = _remap(
        _load_nifti_zyx(folder / f"{case}_seg.nii.gz"), {int(k): int(v) for k, v in cfg["label_map"].items()}
    )
    image = match_channels(percentile_scale(volume), in_chans) * (volume.max(axis=0, keepdims=True) > 0)
    data = _volume_task(cfg, image.astype(np.float32), label, list(cfg["class_names"]))
    data.source = dict(cfg)
    if len(image) == len(cfg["modalities"]):  # one channel per sequence (not averaged or repeated)
        data.channel_names = [str(m) for m in cfg["modalities"]]
    return data


def load_mni152_tissue(cfg: dict[str, Any], in_chans: int = 1) -> SegmentationData:
    """MNI152 2009a T1 with labels from nilearn's GM/WM probability maps (argmax of bg/GM/WM, p > 0.5)."""
    from ssl_med.data.sources.demo import mni152

    t1, _, _ = mni152("T1")
    gm = mni152("GM")[0][0].astype(np.float32) / 255.0
    wm = mni152("WM")[0][0].astype(np.float32) / 255.0
    label = np.where(np.maximum(gm, wm) > float(cfg.get("threshold", 0.5)), np.where(wm >= gm, 2, 1), 0)
    image = match_channels(percentile_scale(t1), in_chans)
    return _volume_task(cfg, image.astype(np.float32), label.astype(np.int64), list(cfg["class_names"]))


def load_kvasir(cfg: dict[str, Any], in_chans: int = 1) -> SegmentationData:
    """Kvasir-SEG pairs (RGB photo, JPEG mask thresholded at 127) resized to ``image_size``.

    Files are sorted by name and assigned to splits in order by ``split_counts`` (train, val, test).
    """
    from PIL import Image

    folder = Path(cfg["path"])
    names = sorted(p.name for p in (folder / "images").glob("*.jpg"))
    if not names:
        raise FileNotFoundError(f"no images in {folder / 'images'} (eval_data.path)")
    size = [int(cfg["image_size"])] * 2
    items = []
    for name in names:
        rgb = np.asarray(Image.open(folder / "images" / name).convert("RGB"), dtype=np.float32) / 255.0
        mask = np.asarray(Image.open(folder / "masks" / name).convert("L")) > 127
        x = resize(torch.from_numpy(match_channels(rgb.transpose(2, 0, 1), in_chans).copy())[None], size)[0]
        y = resize(torch.from_numpy(mask[None, None].astype(np.float32)), size, mode="nearest")[0, 0]
        items.append((x.numpy(), y.long().numpy()))
    counts = list(cfg["split_counts"])
    bounds = np.cumsum([0, *counts])
    split_items = {s: items[bounds[i] : bounds[i + 1]] for i, s in enumerate(SPLITS)}
    return SegmentationData(cfg["name"], 2, split_items, list(cfg["class_names"]))


LOADERS = {
    "medmnist": load_medmnist,
    "brats": load_brats,
    "kvasir": load_kvasir,
    "mni152_tissue": load_mni152_tissue,
}


RESOLVERS = {"medmnist": resolve_medmnist}


def compose_evaluate(overrides: Sequence[str]) -> Any:
    """The ``ssl_med evaluate`` config composed with Hydra-style ``overrides`` (a ``DictConfig``);
    inside a running Hydra app (e.g. ``ssl_med pretrain``) its config search path is used."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    if GlobalHydra.instance().is_initialized():
        return compose(config_name="evaluate", overrides=list(overrides))
    with initialize_config_module(config_module="ssl_med.conf", version_base="1.3"):
        return compose(config_name="evaluate", overrides=list(overrides))


def eval_data_config(name: str, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """The composed, resolved ``eval_data=<name>`` group as a dict, with Hydra-style ``overrides``
    (e.g. ``["eval_data.path=/x/foo.npz"]``)."""
    from omegaconf import OmegaConf

    cfg = compose_evaluate([f"eval_data={name}", *overrides])
    return OmegaConf.to_container(cfg.eval_data, resolve=True)  # type: ignore[return-value]


def resolve_eval_data(cfg: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` checked, with the fields it leaves to the data filled in (MedMNIST: task, dims, size).

    Cheap (no image is decoded), so callers run it before any model or data loading to fail early
    on a misspelt kind or task.
    """
    kind = cfg.get("kind")
    if kind not in LOADERS:
        raise ValueError(f"unknown eval_data.kind {kind!r}; choose one of {sorted(LOADERS)}")
    resolve = RESOLVERS.get(kind)
    return resolve(cfg) if resolve is not None else dict(cfg)


def load_eval_data(cfg: dict[str, Any], in_chans: int | None = 1) -> ClassificationData | SegmentationData:
    """Dispatch on ``cfg['kind']`` (``medmnist``, ``brats``, ``kvasir``, ``mni152_tissue``);
    ``in_chans=None`` keeps every channel (channel-adaptive encoders)."""
    return LOADERS[cfg["kind"]](resolve_eval_data(cfg), in_chans)
