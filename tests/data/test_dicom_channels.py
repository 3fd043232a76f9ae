"""DICOM series of one study as the channels of one image (issue #19, channel identity end to end):
series descriptions become channel names in the store, crops and batches; series that cannot be
stacked stay separate images with the reason in the ingest report; a corrupt series is reported and
the others are still ingested."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
from torch.utils.data import DataLoader

from ssl_med.cli import main
from ssl_med.data.channels import batch_channel_names
from ssl_med.data.crops import RandomCropDataset
from ssl_med.data.ingest import IngestOptions, ingest
from ssl_med.data.readers.dicom_case import KIND, sequence_name
from ssl_med.data.readers.discover import discover
from ssl_med.data.store import ImageStore

STUDY = "1.2.826.0.1.3680043.8.498.19"
SHAPE = (4, 6, 7)  # (slices K, rows Y, columns X): every axis different, so a swapped axis shows
SEQUENCES = {"T1": 1000, "T1 CE": 2000, "FLAIR": 4000}  # description: level of that series' voxels


def mr_series(
    folder: Path, description: str | None, level: int, study: str = STUDY, shape: tuple[int, int, int] = SHAPE,
    step: float = 2.0, seed: int = 0,
) -> np.ndarray:
    """Write pydicom's ``MR_small.dcm`` as a series of ``shape[0]`` slices ``step`` mm apart (files in
    shuffled order, named after the description) with voxels around ``level``; returns them ``(K, Y, X)``
    in position order."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    base = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    base.pop("DataSetTrailingPadding", None)  # pixel data last: a truncated file loses pixels
    rng = np.random.default_rng(seed + level)
    values = (level + rng.integers(0, 100, shape)).astype(np.int16)
    uid, prefix = generate_uid(), sequence_name(description or "") or "nodesc"
    for n, k in enumerate(rng.permutation(shape[0])):
        ds = copy.deepcopy(base)
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = study, uid, generate_uid()
        if description is None:
            ds.pop("SeriesDescription", None)
        else:
            ds.SeriesDescription = description
        ds.Rows, ds.Columns = shape[1], shape[2]
        ds.PixelSpacing = [0.5, 0.75]
        ds.ImagePositionPatient = [-10.0, -20.0, 5.0 + step * float(k)]
        ds.PixelData = values[k].tobytes()
        ds.save_as(folder / f"{prefix}_{level}_{n:02d}.dcm")
    return values


def write_study(folder: Path, descriptions: dict[str, int] = SEQUENCES) -> dict[str, np.ndarray]:
    return {d: mr_series(folder, d, level) for d, level in descriptions.items()}


def test_sequence_names_follow_the_nifti_vocabulary() -> None:
    spellings = {"T1": "t1", "T1 CE": "t1ce", "t1-Gd": "t1ce", "T2*": "t2star", "FLAIR": "flair", "ADC": "adc",
                 "Ax T2 FLAIR": "ax_t2_flair", "T1 post contrast": "t1ce", "  ": ""}  # fmt: skip
    assert {d: sequence_name(d) for d in spellings} == spellings


def test_three_series_of_one_study_become_one_image_with_named_channels(tmp_path: Path) -> None:
    series = write_study(tmp_path / "in" / "study1")
    out = str(tmp_path / "s.zarr")
    messages: list[str] = []
    report = ingest([str(tmp_path / "in")], out, IngestOptions(orientation=""), progress=False, log=messages.append)
    assert report.written == 1 and not report.skipped and not report.notes and not messages, report.summary()
    store = ImageStore(out)
    meta = store.manifest["study1"]
    assert meta.channel_names == ("t1", "t1ce", "flair") and meta.modality == "MR"  # NIfTI sequence order
    assert meta.shape == (3, *SHAPE)
    stored = store.read("study1")  # (C, Z, Y, X): slices in position order, each channel exactly its series
    for c, description in enumerate(("T1", "T1 CE", "FLAIR")):
        np.testing.assert_array_equal(stored[c], series[description])
    np.testing.assert_allclose(meta.spacing, (2.0, 0.5, 0.75))
    assert meta.extra["series"]["t1ce"]["description"] == "T1 CE" and meta.extra["series"]["t1"]["n_files"] == 4

    # stacking off: today's separate single-channel images, voxel for voxel the channels above
    apart = str(tmp_path / "apart.zarr")
    report = ingest([str(tmp_path / "in")], apart, IngestOptions(orientation=""), progress=False,
                    series_channels=False)  # fmt: skip
    assert report.written == 3 and not report.notes
    separate = ImageStore(apart)
    assert sorted(separate.manifest) == ["study1_s0", "study1_s1", "study1_s2"]
    channels = sorted(range(3), key=lambda c: stored[c].mean())
    images = sorted(separate.manifest, key=lambda n: separate.read(n).mean())
    for c, name in zip(channels, images):
        np.testing.assert_array_equal(separate.read(name)[0], stored[c])


@pytest.mark.parametrize(
    ("layout", "stacked", "reason"),
    [
        ({"T1": (1000, STUDY, SHAPE), "T2": (3000, STUDY, (5, 6, 7))}, [], "matches no other series"),
        ({"T1": (1000, STUDY, SHAPE), "T2": (3000, "1.2.3.4", SHAPE)}, [], "another study"),
        ({"T2": (1000, STUDY, SHAPE), "t2 ": (3000, STUDY, SHAPE)}, [], "share the sequence name(s) t2"),
        ({"T1": (1000, STUDY, SHAPE), None: (3000, STUDY, SHAPE)}, [], "no usable SeriesDescription"),
        ({"T1": (1000, STUDY, SHAPE), "T2": (3000, STUDY, SHAPE), "Localizer": (5000, STUDY, (1, 6, 7))},
         ["t1", "t2"], "series 'Localizer': a single image, not a volume"),
    ],
)  # fmt: skip
def test_series_that_cannot_be_stacked_stay_separate_with_the_reason(
    tmp_path: Path, layout: dict, stacked: list[str], reason: str
) -> None:
    for description, (level, study, shape) in layout.items():
        mr_series(tmp_path / "study", description, level, study=study, shape=shape)
    notes: list[tuple[str, str]] = []
    sources, problems = discover([str(tmp_path / "study")], notes=notes)
    assert not problems
    cases = [s for s in sources if s.kind == KIND]
    assert len(cases) == (1 if stacked else 0) and len(sources) == len(layout) - len(stacked) + len(cases)
    assert len(notes) == 1 and notes[0][0] == str(tmp_path / "study") and reason in notes[0][1], notes
    off: list[tuple[str, str]] = []
    assert all(s.kind == "dicom" for s in discover([str(tmp_path / "study")], series_channels=False, notes=off)[0])
    assert not off


def test_a_grid_mismatch_is_ingested_as_separate_images_and_reported(tmp_path: Path) -> None:
    t1 = mr_series(tmp_path / "in" / "study1", "T1", 1000)
    t2 = mr_series(tmp_path / "in" / "study1", "T2", 3000, step=3.0)  # same shape, other slice spacing
    out = str(tmp_path / "s.zarr")
    messages: list[str] = []
    report = ingest([str(tmp_path / "in")], out, IngestOptions(orientation=""), progress=False, log=messages.append)
    store = ImageStore(out)
    assert report.written == 2 and not report.skipped and sorted(store.manifest) == ["study1_s0", "study1_s1"]
    assert {store.read(n).shape for n in store.manifest} == {(1, *SHAPE)}  # nothing resampled
    assert sorted(int(store.read(n).mean()) // 1000 for n in store.manifest) == [1, 3]
    np.testing.assert_array_equal(min((store.read(n)[0] for n in store.manifest), key=np.mean), t1)
    np.testing.assert_array_equal(max((store.read(n)[0] for n in store.manifest), key=np.mean), t2)
    assert len(report.notes) == 1 and "2 DICOM series kept as separate images" in report.notes[0][1]
    assert "matches no other series" in report.summary() and len(messages) == 1 and "note" in messages[0]


def test_a_corrupt_file_is_reported_and_the_good_series_still_ingested(tmp_path: Path) -> None:
    series = write_study(tmp_path / "in" / "study1")
    victim = sorted((tmp_path / "in" / "study1").glob("t1ce_*.dcm"))[1]
    victim.write_bytes(victim.read_bytes()[:-20])  # pixel data cut short; the header is whole
    out = str(tmp_path / "s.zarr")
    messages: list[str] = []
    report = ingest([str(tmp_path / "in")], out, IngestOptions(orientation=""), progress=False, log=messages.append)
    assert report.written == 1 and len(report.skipped) == 1 and len(messages) == 1, report.summary()
    why = report.skipped[0][1]
    assert f"corrupt DICOM file {victim.name}" in why and "series 'T1 CE'" in why and "channels t1, flair" in why
    store = ImageStore(out)
    assert store.manifest["study1"].channel_names == ("t1", "flair")
    np.testing.assert_array_equal(store.read("study1")[0], series["T1"])
    np.testing.assert_array_equal(store.read("study1")[1], series["FLAIR"])
    again = ingest([str(tmp_path / "in")], out, IngestOptions(orientation=""), progress=False)
    assert again.written == 0 and again.present == 1  # the same files: not written twice


def test_names_reach_crops_and_batches_and_given_names_do_not_override_them(tmp_path: Path) -> None:
    """As ``test_ingest_channel_names`` does for NIfTI: the command line, the store, crops selected by
    ``data.channels`` and the batch's names; ``--channel-names`` leaves named DICOM channels alone."""
    series = write_study(tmp_path / "in" / "study1")
    store = tmp_path / "s.zarr"
    args = ["ingest", str(tmp_path / "in"), "--out", str(store), "--orientation", "", "--no-progress"]
    assert main([*args, "--channel-names", "A,B,C"]) == 0
    assert ImageStore(store).manifest["study1"].channel_names == ("t1", "t1ce", "flair")
    ds = RandomCropDataset(str(store), SHAPE, num_channels=None, length=2, channels=["FLAIR", "t1"],
                           return_channel_names=True, normalise="batch")  # fmt: skip
    batch = next(iter(DataLoader(ds, batch_size=2)))
    assert batch_channel_names(batch) == [["FLAIR", "t1"]] * 2  # selected case-insensitively, as asked
    for b in range(2):  # the whole volume as the crop: exactly the selected series, in the asked order
        np.testing.assert_array_equal(batch["image"][b, 0].numpy(), series["FLAIR"])
        np.testing.assert_array_equal(batch["image"][b, 1].numpy(), series["T1"])
    ds = RandomCropDataset(str(store), (2, 4, 4), num_channels=None, length=2, return_channel_names=True)
    assert next(iter(DataLoader(ds, batch_size=2)))["channel_names"] == ["t1|t1ce|flair"] * 2

    apart = tmp_path / "apart.zarr"
    assert main(["ingest", str(tmp_path / "in"), "--out", str(apart), "--no-progress", "--no-series-channels"]) == 0
    assert len(ImageStore(apart).manifest) == 3


def test_repair_rewrites_a_stacked_image_from_its_series(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_study(tmp_path / "in" / "study1")
    store = tmp_path / "s.zarr"
    assert main(["ingest", str(tmp_path / "in"), "--out", str(store), "--no-progress", "--chunk", "4"]) == 0
    before = ImageStore(store).read("study1")
    chunks = sorted(p for p in (store / "images" / "study1" / "0").rglob("*") if p.is_file() and p.name != "zarr.json")
    chunks[0].unlink()
    assert main(["ingest", "--verify", "--repair", "--out", str(store)]) == 0
    assert "1 images repaired" in capsys.readouterr().out
    assert ImageStore(store).manifest["study1"].channel_names == ("t1", "t1ce", "flair")
    np.testing.assert_array_equal(ImageStore(store).read("study1"), before)


def test_repair_finds_series_ingested_one_image_each(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A store written with --no-series-channels (or before stacking existed) stays repairable."""
    write_study(tmp_path / "in" / "study1")
    store = tmp_path / "s.zarr"
    args = ["ingest", str(tmp_path / "in"), "--out", str(store), "--no-progress", "--chunk", "4"]
    assert main([*args, "--no-series-channels"]) == 0
    names = sorted(ImageStore(store).manifest)
    assert len(names) == 3
    before = {n: ImageStore(store).read(n) for n in names}
    chunks = sorted(p for p in (store / "images" / names[0] / "0").rglob("*") if p.is_file() and p.name != "zarr.json")
    chunks[0].unlink()
    capsys.readouterr()
    assert main(["ingest", "--verify", "--repair", "--out", str(store)]) == 0
    assert "1 images repaired" in capsys.readouterr().out
    for n in names:
        np.testing.assert_array_equal(ImageStore(store).read(n), before[n])


def multiframe_series(
    folder: Path, description: str, level: int, shape: tuple[int, int, int] = SHAPE, step: float = 2.0,
    positions: bool = True, name: str | None = None,
) -> np.ndarray:
    """Write one enhanced multi-frame file (``NumberOfFrames`` = ``shape[0]``) on the grid of
    :func:`mr_series`: frames in shuffled order, plane positions per frame and orientation, pixel spacing
    and rescale in the shared functional groups (none at the top level; ``positions=False`` leaves the
    per-frame groups out); returns the voxels ``(K, Y, X)`` in position order, after rescale."""
    import pydicom
    from pydicom.data import get_testdata_file
    from pydicom.dataset import Dataset
    from pydicom.uid import generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.pop("DataSetTrailingPadding", None)
    orientation = [float(v) for v in ds.ImageOrientationPatient]
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing", "SliceThickness"):
        ds.pop(keyword, None)
    rng = np.random.default_rng(level)
    values = (level + rng.integers(0, 100, shape)).astype(np.int16)
    order = rng.permutation(shape[0])  # frame n holds slice order[n]
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID = STUDY, generate_uid(), generate_uid()
    ds.SeriesDescription, ds.NumberOfFrames, ds.Rows, ds.Columns = description, shape[0], shape[1], shape[2]
    measures, plane, rescale, shared = Dataset(), Dataset(), Dataset(), Dataset()
    measures.PixelSpacing, measures.SliceThickness = [0.5, 0.75], step
    plane.ImageOrientationPatient = orientation
    rescale.RescaleSlope, rescale.RescaleIntercept, rescale.RescaleType = 2, -10, "US"
    shared.PixelMeasuresSequence, shared.PlaneOrientationSequence = [measures], [plane]
    shared.PixelValueTransformationSequence = [rescale]
    ds.SharedFunctionalGroupsSequence = [shared]
    if positions:
        frames = []
        for k in order:
            position, frame = Dataset(), Dataset()
            position.ImagePositionPatient = [-10.0, -20.0, 5.0 + step * float(k)]
            frame.PlanePositionSequence = [position]
            frames.append(frame)
        ds.PerFrameFunctionalGroupsSequence = frames
    ds.PixelData = values[order].tobytes()
    ds.save_as(folder / f"{name or sequence_name(description)}_mf.dcm")
    return values.astype(np.int64) * 2 - 10


def test_multi_frame_volumes_on_the_grid_of_the_other_series_are_channels(tmp_path: Path) -> None:
    """One enhanced multi-frame file per sequence (T1ce, FLAIR) and a single-frame series (T1), one grid:
    one image, each channel its volume in position order (frames reordered, functional-group rescale)."""
    study = tmp_path / "in" / "study1"
    t1 = mr_series(study, "T1", 1000)
    t1ce = multiframe_series(study, "T1 post contrast", 2000)
    flair = multiframe_series(study, "FLAIR", 4000)
    out = str(tmp_path / "s.zarr")
    report = ingest([str(tmp_path / "in")], out, IngestOptions(orientation=""), progress=False)
    assert report.written == 1 and not report.skipped and not report.notes, report.summary()
    store = ImageStore(out)
    meta = store.manifest["study1"]
    assert meta.channel_names == ("t1", "t1ce", "flair") and meta.shape == (3, *SHAPE)
    stored = store.read("study1")
    for c, expected in enumerate((t1, t1ce, flair)):
        np.testing.assert_array_equal(stored[c], expected)
    np.testing.assert_allclose(meta.spacing, (2.0, 0.5, 0.75))


def test_a_lone_multi_frame_file_gets_the_affine_of_its_frames(tmp_path: Path) -> None:
    from ssl_med.data.readers.base import Source
    from ssl_med.data.readers.dicom import read_series

    slices = mr_series(tmp_path / "single", "T2", 3000)
    frames = multiframe_series(tmp_path / "multi", "T2", 3000)
    (a,) = read_series(Source("dicom", tuple(sorted(map(str, (tmp_path / "single").glob("*.dcm")))), "a"))
    (b,) = read_series(Source("dicom", (str(next((tmp_path / "multi").glob("*.dcm"))),), "b"))
    np.testing.assert_allclose(b.affine, a.affine)
    assert b.extra["geometry"] == "multi-frame"
    np.testing.assert_array_equal(a.array[0].transpose(2, 1, 0), slices)
    np.testing.assert_array_equal(b.array[0].transpose(2, 1, 0), frames)


def test_multi_frame_files_without_frame_positions_stay_separate_with_a_note(tmp_path: Path) -> None:
    study = tmp_path / "in" / "study1"
    multiframe_series(study, "T1", 1000, positions=False)
    multiframe_series(study, "FLAIR", 4000, positions=False)
    out = str(tmp_path / "s.zarr")
    report = ingest([str(tmp_path / "in")], out, IngestOptions(orientation=""), progress=False)
    assert report.written == 2 and not report.skipped, report.summary()
    assert len(report.notes) == 1 and "2 DICOM series kept as separate images" in report.notes[0][1]
    assert report.notes[0][1].count("a multi-frame file without per-frame plane positions") == 2
    assert {ImageStore(out).read(n).shape for n in ImageStore(out).manifest} == {(1, *SHAPE)}  # read as before
