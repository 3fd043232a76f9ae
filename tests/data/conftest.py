"""Real input files for the ingest tests, written into a temporary folder per session.

pydicom's CT/MR test slices (and a CT series built from the CT slice by moving it along the slice
normal), scikit-image photographs/microscopy saved as PNG/JPEG/TIFF, and deliberately bad files.
"""

from __future__ import annotations

import copy
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest


def ct_series(
    folder: Path, positions: list[float], uid: str, intercepts: list[float] | None = None
) -> list[np.ndarray]:
    """Write pydicom's ``CT_small.dcm`` as a series at slice ``positions`` (mm, shuffled file order).

    Returns the expected rescaled slices ``(Y, X)`` in position order.
    """
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    base = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    expected = []
    order = np.random.default_rng(0).permutation(len(positions))
    for n, k in enumerate(order):
        ds = copy.deepcopy(base)
        ds.SeriesInstanceUID = uid
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = int(k) + 1
        ipp = [float(v) for v in base.ImagePositionPatient]
        ds.ImagePositionPatient = [ipp[0], ipp[1], ipp[2] + positions[k]]
        pixels = base.pixel_array.astype(np.int16) + np.int16(10 * k)  # each slice distinct
        ds.PixelData = pixels.tobytes()
        intercept = -1024.0 if intercepts is None else intercepts[k]
        ds.RescaleIntercept = intercept
        ds.save_as(folder / f"slice_{n:03d}.dcm")
    for k in range(len(positions)):
        pixels = base.pixel_array.astype(np.int16) + np.int16(10 * k)
        expected.append(pixels.astype(np.float64) + (-1024.0 if intercepts is None else intercepts[k]))
    return expected


@pytest.fixture(scope="session")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Good and bad input files of every kind (see the module docstring)."""
    import nibabel as nib
    import tifffile
    from PIL import Image
    from pydicom.data import get_testdata_file
    from skimage import data

    root = tmp_path_factory.mktemp("inputs")
    out: dict[str, Any] = {"root": root}
    good, bad = root / "good", root / "bad"
    for f in ("CT_small.dcm", "MR_small.dcm"):
        (good / "dicom_single").mkdir(parents=True, exist_ok=True)
        shutil.copy(get_testdata_file(f), good / "dicom_single" / f)
    intercepts = [-1024.0, -1000.0, -1024.0, -1010.0, -1024.0, -1024.0]  # rescale applied per slice
    out["series_expected"] = np.stack(  # type: ignore[assignment]
        ct_series(
            good / "ct_series", [0.0, 2.5, 5.0, 7.5, 10.0, 12.5], "1.2.826.0.1.3680043.8.498.1", intercepts
        )
    )
    Image.fromarray(data.cell()).save(good / "cell.png")
    Image.fromarray(data.immunohistochemistry()).save(good / "ihc.jpg", quality=95)
    tifffile.imwrite(good / "cell_stack.tif", np.stack([data.cell()] * 3), metadata={"axes": "ZYX"})
    tifffile.imwrite(
        good / "ihc_channels.tif", data.immunohistochemistry().transpose(2, 0, 1), metadata={"axes": "CYX"}
    )
    np.save(good / "array.npy", np.arange(20 * 30, dtype=np.float32).reshape(20, 30))
    # bad inputs: a truncated (corrupt) NIfTI, a NaN-only volume, a zero-size image, a series with a
    # missing slice, a series with a truncated file
    bad.mkdir()
    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)), bad / "whole.nii.gz")
    (bad / "corrupt.nii.gz").write_bytes((bad / "whole.nii.gz").read_bytes()[:60])
    (bad / "whole.nii.gz").unlink()
    nib.save(nib.Nifti1Image(np.full((6, 6, 6), np.nan, np.float32), np.eye(4)), bad / "nan_volume.nii.gz")
    (bad / "empty.png").write_bytes(b"")
    ct_series(bad / "gap_series", [0.0, 2.5, 5.0, 10.0, 12.5], "1.2.826.0.1.3680043.8.498.2")
    ct_series(bad / "truncated_series", [0.0, 2.5, 5.0], "1.2.826.0.1.3680043.8.498.3")
    victim = sorted((bad / "truncated_series").iterdir())[1]
    victim.write_bytes(victim.read_bytes()[: victim.stat().st_size // 2])
    out["good"], out["bad"] = good, bad
    return out


@pytest.fixture(scope="session")
def brats_store(shared_data: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The BraTS case (4 sequences + seg) ingested once, reoriented to RAS."""
    from ssl_med.data.ingest import ingest

    out = tmp_path_factory.mktemp("brats") / "brats.zarr"
    report = ingest([str(shared_data / "brats2020_sample")], str(out), progress=False)
    assert report.written == 1, report.summary()
    return str(out)
