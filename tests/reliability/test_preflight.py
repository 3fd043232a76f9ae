"""Careless input caught before any work: a run that cannot train, hub names that are paths, an export
into a folder it does not own, a NIfTI header that declares terabytes, CT files taken for MR sequences."""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_module

from ssl_med.config import ConfigError, parse_pretrain_config
from ssl_med.export import ExportTargetError, export_encoder, load_pretrained, save_encoder
from ssl_med.registry import BACKBONES


@pytest.mark.parametrize("steps", [0, -1])
def test_a_run_without_steps_is_refused(steps: int) -> None:
    with initialize_config_module(config_module="ssl_med.conf", version_base="1.3"):
        raw = compose(config_name="pretrain", overrides=[f"trainer.max_steps={steps}"])
    with pytest.raises(ConfigError, match=f"trainer.max_steps={steps}.*random initialisation"):
        parse_pretrain_config(raw)


@pytest.mark.parametrize(
    "name", ["../x", "org/", "/abs", "org/../x", "a/b/c", "org/na me", "org/x.git", "-org/x"]
)
def test_bad_push_to_names_fail_before_the_folder_is_written(name: str, tmp_path: Path) -> None:
    out = tmp_path / "export"
    with pytest.raises(ExportTargetError, match="is not a hub repository id"):
        export_encoder(tmp_path / "no_such_run", out, push_to=name)  # the name is judged before the source
    assert not out.exists()


@pytest.fixture()
def export_dir(tmp_path: Path) -> Path:
    """An ssl_med export of a tiny 2D ViT."""
    backbone = {
        "name": "vit",
        "spatial_dims": 2,
        "embed_dim": 32,
        "depth": 1,
        "num_heads": 2,
        "patch_size": 4,
        "img_size": 8,
    }
    encoder = BACKBONES.build("vit", **{k: v for k, v in backbone.items() if k != "name"})
    return save_encoder(encoder, tmp_path / "source", {"backbone": backbone}, model_card=False)


def test_export_refuses_a_foreign_folder_without_overwrite(export_dir: Path, tmp_path: Path) -> None:
    project = tmp_path / "project"
    project.mkdir()
    files = {"README.md": "# my project\n", "config.json": '{"lr": 1}\n', "notes.txt": "keep me\n"}
    for name, text in files.items():
        (project / name).write_text(text)
    with pytest.raises(ExportTargetError, match=r"not empty and not an ssl_med export.*overwrite=true"):
        export_encoder(export_dir, project)
    assert {p.name: p.read_text() for p in project.iterdir()} == files  # untouched

    export_encoder(export_dir, project, overwrite=True)
    assert (project / "notes.txt").read_text() == "keep me\n"  # only the export's own names are replaced
    assert load_pretrained(project).embed_dim == 32


def test_export_may_replace_a_previous_export(export_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "again"
    export_encoder(export_dir, out)
    export_encoder(export_dir, out)  # its own earlier export: no overwrite=true needed
    assert json.loads((out / "config.json").read_text())["backbone"]["name"] == "vit"
    with pytest.raises(ExportTargetError, match="is a file"):
        export_encoder(export_dir, out / "config.json")


def test_cli_export_refusal_is_one_line(
    export_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from ssl_med.cli import main as cli

    (tmp_path / "mine.txt").write_text("x")
    assert cli(["export", f"checkpoint={export_dir}", f"out={tmp_path}"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("ssl_med export: out=") and "\n" not in err and "Traceback" not in err


def _huge_header(path: Path) -> None:
    """A NIfTI whose header declares 30000³ int16 voxels (54 TB) followed by 128 bytes of data."""
    import nibabel as nib

    header = nib.Nifti1Header()
    header.set_data_dtype(np.int16)
    header.set_data_shape((30000, 30000, 30000))
    header["vox_offset"] = 352
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "wb") as f:
        header.write_to(f)
        f.write(b"\0" * 4 + bytes(128))


@pytest.mark.parametrize("name", ["huge.nii", "huge.nii.gz"])
def test_huge_nifti_header_reason_says_what_it_declares(name: str, tmp_path: Path) -> None:
    from ssl_med.data.readers import ReadError
    from ssl_med.data.readers.nifti import load_nifti

    _huge_header(tmp_path / name)
    with pytest.raises(ReadError, match=r"header declares 30000x30000x30000 int16 voxels \(54.0 TB\)"):
        load_nifti(tmp_path / name)


def test_ct_files_in_one_folder_are_separate_images(tmp_path: Path) -> None:
    import nibabel as nib

    from ssl_med.data.readers.discover import discover

    for name in ("ct_liver", "ct_lung", "case1_t1", "case1_flair", "case1_seg"):
        folder = tmp_path / ("ct" if name.startswith("ct") else "case1")
        folder.mkdir(exist_ok=True)
        nib.save(nib.Nifti1Image(np.ones((4, 4, 4), np.int16), np.eye(4)), folder / f"{name}.nii.gz")
    sources, problems = discover([str(tmp_path)])
    kinds = {s.name: (s.kind, len(s.paths)) for s in sources}
    assert kinds == {"case1": ("case", 3), "ct_liver": ("nifti", 1), "ct_lung": ("nifti", 1)} and not problems
