"""Clinical spellings of post-contrast T1 become ``t1ce`` (pre-contrast ones ``t1``), in DICOM series
descriptions and NIfTI case-folder suffixes alike (issue #19)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from ssl_med.data.readers.base import Source
from ssl_med.data.readers.dicom_case import sequence_name
from ssl_med.data.readers.nifti import canonical_sequence, case_suffixes, read_case

#: description -> channel name (sequence_name); ``t1ce`` only for post-contrast T1
SPELLINGS = {
    # post-contrast T1
    "T1 post contrast": "t1ce",
    "T1 POST": "t1ce",
    "T1+C": "t1ce",
    "T1 + C": "t1ce",
    "T1 Gd": "t1ce",
    "T1-Gd": "t1ce",
    "T1 C+": "t1ce",
    "T1-CE": "t1ce",
    "T1 CE": "t1ce",
    "T1C": "t1ce",
    "t1ce": "t1ce",
    "T1 W/ contrast": "t1ce",
    "MPRAGE post": "t1ce",
    "MP-RAGE post Gd": "t1ce",
    "Sag T1 MPRAGE +C": "t1ce",
    "Ax T1 FS +GD": "t1ce",
    "T1_post": "t1ce",
    "T1 postcontrast": "t1ce",
    # pre-contrast (and plain) T1 is never t1ce
    "T1": "t1",
    "t1": "t1",
    "T1 pre": "t1",
    "T1 pre contrast": "t1",
    "T1 PRE-CONTRAST": "t1",
    "T1 precontrast": "t1",
    "T1 w/o contrast": "t1",
    "T1 without contrast": "t1",
    "T1 native": "t1",
    "MPRAGE pre": "t1",
    "T1 pre and post": "t1",
    # other sequences, and T1 without a contrast word, keep their own names
    "MPRAGE": "mprage",
    "Ax T1 SE": "ax_t1_se",
    "T1 map": "t1_map",
    "T1 with FS": "t1_with_fs",
    "FLAIR": "flair",
    "T2 FLAIR post": "t2_flair_post",
    "DWI post": "dwi_post",
    "T2*": "t2star",
    "ADC": "adc",
    "": "",
}


@pytest.mark.parametrize(("description", "expected"), list(SPELLINGS.items()))
def test_series_descriptions_map_to_sequence_names(description: str, expected: str) -> None:
    assert sequence_name(description) == expected


def test_only_contrast_spellings_of_t1_are_canonicalised() -> None:
    assert canonical_sequence("T1") is None and canonical_sequence("FLAIR post") is None
    assert canonical_sequence("T1 post") == "t1ce" and canonical_sequence("T1 pre") == "t1"


def test_case_folder_suffixes_use_the_vocabulary(tmp_path: Path) -> None:
    import nibabel as nib

    files = []
    for suffix, level in (("t1", 1.0), ("t1_post", 2.0), ("flair", 3.0), ("seg", 1.0)):
        path = tmp_path / f"case7_{suffix}.nii.gz"
        nib.save(nib.Nifti1Image(np.full((4, 5, 6), level, np.float32), np.eye(4)), path)
        files.append(str(path))
    assert set(case_suffixes(files) or {}) == {"t1", "t1ce", "flair", "seg"}
    (record,) = read_case(Source(name="case7", kind="nifti_case", paths=tuple(files)))
    assert record.channel_names == ("t1", "t1ce", "flair")
    assert [float(c.mean()) for c in record.array] == [1.0, 2.0, 3.0]
    # a dataset's own names stay as it spells them (BraTS 2023: t1c)
    assert set(case_suffixes(["x_t1n.nii.gz", "x_t1c.nii.gz"]) or {}) == {"t1n", "t1c"}
