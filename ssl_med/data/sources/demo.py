"""The embedded demo data (``data=demo``, ``data=demo3d``): real medical images that ship with the install.

Nothing is downloaded: every image comes from a dependency's package data.

* 3D: the MNI152 2009a symmetric T1-weighted brain MRI template (1 mm, nilearn).
* 2D: that MRI (sampled as axial slices), a retinal fundus photograph and a fundus image with
  microaneurysms, an immunohistochemistry (IHC) histology image and a cell microscopy image
  (scikit-image), and a CT and an MR slice (pydicom's test files).

The store is built once into the cache folder (``$SSL_MED_CACHE`` or ``~/.cache/ssl_med``) and reused.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from importlib import resources
from pathlib import Path

import numpy as np

from ssl_med.data.channels import GRAY
from ssl_med.data.store import ImageStore
from ssl_med.registry import SOURCES

DEMO_VERSION = 3  # 2: OME-Zarr 0.5 image groups (store version 2); 3: checksummed, inventoried chunks


def cache_dir() -> Path:
    return Path(os.environ.get("SSL_MED_CACHE", Path.home() / ".cache" / "ssl_med"))


MNI152_FILES = {
    "T1": "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz",
    "GM": "mni_icbm152_gm_tal_nlin_sym_09a_converted.nii.gz",
    "WM": "mni_icbm152_wm_tal_nlin_sym_09a_converted.nii.gz",
}


def mni152(kind: str = "T1") -> tuple[np.ndarray, tuple[float, ...], str]:
    """An MNI152 2009a volume shipped with nilearn (``T1`` image, ``GM``/``WM`` probability maps).

    Returns ``(1, Z, Y, X)`` uint8 (0-255, as stored), spacing ``(z, y, x)`` in mm, and its source.
    """
    import nibabel as nib

    path = resources.files("nilearn.datasets") / "data" / MNI152_FILES[kind]
    image = nib.load(str(path))
    data = np.asarray(image.dataobj)  # (X, Y, Z), RAS, uint8 on disk
    zooms = tuple(float(z) for z in image.header.get_zooms()[:3])
    return data.transpose(2, 1, 0)[None], zooms[::-1], f"nilearn: {MNI152_FILES[kind]}"


def _skimage_images() -> list[tuple[str, np.ndarray, str, tuple[str, ...]]]:
    from skimage import data

    out = []
    for name, loader, modality in [
        ("retina_fundus", data.retina, "fundus"),
        ("retina_microaneurysms", data.microaneurysms, "fundus"),
        ("ihc_histology", data.immunohistochemistry, "histology"),
        ("cell_microscopy", data.cell, "microscopy"),
    ]:
        img = loader()
        arr = img.transpose(2, 0, 1) if img.ndim == 3 else img[None]
        channels = ("R", "G", "B") if arr.shape[0] == 3 else (GRAY,)
        out.append((name, arr, modality, channels))
    return out


def _dicom_slices() -> list[tuple[str, np.ndarray, tuple[float, float], str]]:
    import pydicom
    from pydicom.data import get_testdata_file

    out = []
    for file in ("CT_small.dcm", "MR_small.dcm"):
        ds = pydicom.dcmread(get_testdata_file(file))
        pixels = ds.pixel_array.astype(np.float32)
        pixels = pixels * float(getattr(ds, "RescaleSlope", 1.0)) + float(
            getattr(ds, "RescaleIntercept", 0.0)
        )
        spacing = tuple(float(s) for s in ds.PixelSpacing)
        out.append((f"dicom_{ds.Modality.lower()}", pixels[None], spacing, str(ds.Modality)))
    return out


def _build_2d(store: ImageStore) -> None:
    volume, spacing, source = mni152()
    store.add("mni152_t1", volume, spacing, modality="MR", channel_names=("T1",), source=source)
    for name, arr, modality, channels in _skimage_images():
        store.add(
            name, arr, (1.0, 1.0), modality=modality, channel_names=channels, source=f"scikit-image: {name}"
        )
    for name, arr, spacing, modality in _dicom_slices():
        store.add(name, arr, spacing, modality=modality, source=f"pydicom test file: {name}")


def _build_3d(store: ImageStore) -> None:
    volume, spacing, source = mni152()
    store.add("mni152_t1", volume, spacing, modality="MR", channel_names=("T1",), source=source)


def _cached_store(name: str, build: Callable[[ImageStore], None]) -> str:
    path = cache_dir() / f"{name}_v{DEMO_VERSION}.zarr"
    if not path.exists():
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        build(ImageStore(tmp, mode="a"))
        try:
            tmp.rename(path)  # atomic: a half-built store is never seen
        except OSError:  # another process finished first
            shutil.rmtree(tmp, ignore_errors=True)
    return str(path)


@SOURCES.register("demo")
def demo_store(spatial_dims: int = 2) -> str:
    """Path of the demo store for ``spatial_dims`` (built on first use)."""
    if spatial_dims == 2:
        return _cached_store("demo2d", _build_2d)
    if spatial_dims == 3:
        return _cached_store("demo3d", _build_3d)
    raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
