"""``ssl_med ingest`` on real files of every input kind; bad files are skipped with their reason."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import numpy as np
import pytest

from ssl_med.data.ingest import IngestOptions, ingest, ingest_source
from ssl_med.data.readers.discover import discover
from ssl_med.data.store import ImageStore
from ssl_med.data.verify import verify

MNI = resources.files("nilearn.datasets") / "data" / "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"


@pytest.fixture(scope="module")
def mixed_store(inputs, tmp_path_factory) -> tuple[str, object, list[str]]:
    """Good and bad inputs ingested together, volumes kept in their source orientation."""
    out = str(tmp_path_factory.mktemp("mixed") / "s.zarr")
    messages: list[str] = []
    options = IngestOptions(orientation="")
    report = ingest(
        [str(inputs["good"]), str(inputs["bad"])], out, options, progress=False, log=messages.append
    )
    return out, report, messages


def test_good_files_land_and_bad_ones_are_skipped_with_reasons(mixed_store) -> None:
    out, report, messages = mixed_store
    manifest = ImageStore(out).manifest
    assert set(manifest) == {
        "CT_small",
        "MR_small",
        "ct_series",
        "cell",
        "ihc",
        "cell_stack",
        "ihc_channels",
        "array",
    }
    reasons = {Path(what.split(" ")[0]).name: why for what, why in report.skipped}
    assert "unreadable" in reasons["corrupt.nii.gz"]
    assert "no finite values" in reasons["nan_volume.nii.gz"]
    assert "zero-size" in reasons["empty.png"]
    gap = next(why for what, why in report.skipped if "gap_series" in what)
    assert "inconsistent series" in gap and "missing slices" in gap
    truncated = next(why for what, why in report.skipped if "truncated_series" in what)
    assert "corrupt DICOM file slice_001.dcm" in truncated
    assert len(report.skipped) == 5 and len(messages) == 5
    assert report.written == 8 and "8 images written" in report.summary()
    assert verify(out).ok


def test_dicom_slices_and_series(mixed_store, inputs) -> None:
    import pydicom
    from pydicom.data import get_testdata_file

    store = ImageStore(mixed_store[0])
    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    meta = store.manifest["CT_small"]
    assert meta.modality == "CT" and meta.shape == (1, 128, 128)
    np.testing.assert_allclose(meta.spacing, [float(s) for s in ct.PixelSpacing])
    np.testing.assert_array_equal(store.read("CT_small")[0], ct.pixel_array.astype(np.int32) - 1024)  # HU
    series = store.manifest["ct_series"]
    assert series.shape == (1, 6, 128, 128) and series.modality == "CT"
    np.testing.assert_allclose(series.spacing, (2.5, 0.661468, 0.661468), rtol=1e-5)
    # slices in position order (files were shuffled), each with its own rescale intercept
    np.testing.assert_array_equal(store.read("ct_series")[0], inputs["series_expected"])
    assert series.original_affine is not None and series.extra["n_files"] == 6


def test_rasters_and_tiffs(mixed_store) -> None:
    from skimage import data

    store = ImageStore(mixed_store[0])
    np.testing.assert_array_equal(store.read("cell")[0], data.cell())
    assert store.manifest["ihc"].channel_names == ("R", "G", "B") and store.manifest["ihc"].shape == (
        3,
        512,
        512,
    )
    assert store.manifest["cell_stack"].shape == (1, 3, *data.cell().shape)  # pages are Z
    np.testing.assert_array_equal(store.read("ihc_channels"), data.immunohistochemistry().transpose(2, 0, 1))
    assert store.manifest["cell"].unit == "" and store.read("array").shape == (1, 20, 30)


def test_resume_without_duplicates(inputs, tmp_path) -> None:
    out = str(tmp_path / "r.zarr")
    sources, _ = discover([str(inputs["good"])])
    # an interrupted run: arrays of two images were written but never entered the manifest
    for source in sources[:2]:
        assert ingest_source(out, source, IngestOptions(), frozenset()).written
    assert len(ImageStore(out)) == 0 and "not in the manifest" in verify(out).summary()
    first = ingest([str(inputs["good"])], out, progress=False)
    again = ingest([str(inputs["good"])], out, progress=False)
    store = ImageStore(out)
    assert first.written == len(store) == len(sources) == 8 and again.written == 0 and again.present == 8
    assert store.stored_names() == sorted(store.manifest) and verify(out).ok


def test_mni152_nifti_reoriented(tmp_path) -> None:
    import nibabel as nib

    out = str(tmp_path / "m.zarr")
    ingest([str(MNI)], out, progress=False)
    img = nib.load(str(MNI))
    meta = ImageStore(out).manifest["mni_icbm152_t1_tal_nlin_sym_09a_converted"]
    assert meta.orientation == "RAS" and meta.shape == (1, 189, 233, 197) and meta.spacing == (1.0, 1.0, 1.0)
    np.testing.assert_allclose(meta.original_affine, img.affine)
    np.testing.assert_allclose(meta.origin, img.affine[:3, 3][::-1])
    expected = np.asarray(img.dataobj).transpose(2, 1, 0)
    region = (slice(50, 140), slice(60, 130), slice(100, 170))  # crosses 64-voxel chunk borders
    np.testing.assert_array_equal(ImageStore(out).read(meta_name(out), region)[0], expected[region])


def test_resampling_to_a_target_spacing(inputs, tmp_path) -> None:
    out = str(tmp_path / "r.zarr")
    ingest([str(inputs["good"] / "ct_series")], out, IngestOptions(spacing=(5.0, 1.0, 1.0)), progress=False)
    meta = ImageStore(out).manifest["ct_series"]
    assert meta.spacing == pytest.approx((5.0, 1.0, 1.0))
    assert meta.preprocessing["resampled_to"] == [5.0, 1.0, 1.0]
    assert meta.shape[1] in (3, 4) and abs(meta.shape[2] - 128 * 0.661468) <= 1 and meta.dtype == "int16"
    np.testing.assert_allclose(np.linalg.norm(np.asarray(meta.affine)[:3, :3], axis=0), (1.0, 1.0, 5.0))


def meta_name(store: str) -> str:
    return next(iter(ImageStore(store)))


def test_parallel_ingest_with_workers_and_hu_clip(inputs, tmp_path) -> None:
    out = str(tmp_path / "p.zarr")
    options = IngestOptions(hu_clip=(-200.0, 200.0))
    report = ingest([str(inputs["good"] / "ct_series"), str(inputs["good"] / "dicom_single"), str(inputs["bad"])],
                    out, options, workers=2, progress=False)  # fmt: skip
    store = ImageStore(out)
    assert set(store.manifest) == {"ct_series", "CT_small", "MR_small"} and len(report.skipped) == 5
    ct = store.read("ct_series")
    assert (
        ct.min() >= -200
        and ct.max() <= 200
        and store.manifest["ct_series"].preprocessing["hu_clip"] == [-200, 200]
    )
    assert store.manifest["MR_small"].preprocessing.get("hu_clip") is None  # MR is never clipped
    assert store.manifest["ct_series"].orientation == "RAS"


def test_brats_case_folder(brats_store, shared_data) -> None:
    import nibabel as nib

    store = ImageStore(brats_store)
    meta = store.manifest["BraTS20_Training_001"]
    assert meta.channel_names == ("t1", "t1ce", "t2", "flair") and meta.modality == "MR"
    assert meta.shape == (4, 155, 240, 240) and meta.label_maps == ("seg",)
    case = shared_data / "brats2020_sample" / "BraTS20_Training_001" / "BraTS20_Training_001"
    flair = nib.as_closest_canonical(nib.load(f"{case}_flair.nii.gz"))
    seg = nib.as_closest_canonical(nib.load(f"{case}_seg.nii.gz"))
    region = (slice(40, 136), slice(50, 146), slice(100, 196))
    np.testing.assert_array_equal(
        store.read(meta_name(brats_store), region)[3], np.asarray(flair.dataobj).transpose(2, 1, 0)[region]
    )
    label = store.read_label("BraTS20_Training_001", "seg")
    np.testing.assert_array_equal(label[0], np.asarray(seg.dataobj).transpose(2, 1, 0))
    assert set(np.unique(label)) == {0, 1, 2, 4}


def test_medmnist_2d_and_3d_with_labels_and_splits(shared_data, tmp_path) -> None:
    out = str(tmp_path / "mm.zarr")
    files = [shared_data / "medmnist" / "breastmnist.npz", shared_data / "medmnist" / "vesselmnist3d.npz"]
    report = ingest([str(f) for f in files], out, progress=False)
    store = ImageStore(out)
    for f in files:
        with np.load(f) as z:
            for split in ("train", "val", "test"):
                names = sorted(
                    n for n, m in store.manifest.items() if m.split == split and n.startswith(f.stem)
                )
                assert len(names) == len(z[f"{split}_images"])
                k = len(names) // 2
                np.testing.assert_array_equal(store.read(names[k])[0], z[f"{split}_images"][k])
                assert store.manifest[names[k]].label == [int(z[f"{split}_labels"][k, 0])]
    assert store.manifest["vesselmnist3d_train_00000"].shape == (1, 28, 28, 28)
    assert report.written == len(store) == 780 + 1908
    again = ingest([str(f) for f in files], out, progress=False)
    assert again.written == 0 and again.present == len(store)
