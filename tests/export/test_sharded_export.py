"""Exporting and loading from a sharded checkpoint (``trainer=fsdp``): a folder of
``torch.distributed.checkpoint`` shards, read on one process without a process group, and only when
trusted (torch unpickles its index in full).

The folders here are written by the function Lightning's ``ModelParallelStrategy`` writes its sharded
checkpoints with, from the tiny run's single-file checkpoint (one process, so one shard file); the
2-process FSDP run in ``tests/train/test_fsdp.py`` exports a real 2-rank one.
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from lightning.fabric.strategies.model_parallel import _distributed_checkpoint_save
from safetensors.torch import load_file

import ssl_med
from ssl_med.cli import main as cli
from ssl_med.evaluators.api import resolve_encoder_dir
from ssl_med.export import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    ExportError,
    UnsafeWeightsError,
    export_encoder,
    load_source,
)
from ssl_med.weights import (
    is_sharded_checkpoint,
    read_checkpoint_state,
    read_sharded_tensors,
    sharded_model_keys,
)


def write_sharded(checkpoint: dict, folder: Path) -> Path:
    """``checkpoint`` saved as ``ModelParallelStrategy(save_distributed_checkpoint=True)`` saves it: the
    module and optimiser states as shards + ``.metadata``, everything else in ``meta.pt``."""
    checkpoint = dict(checkpoint)
    state = {"state_dict": checkpoint.pop("state_dict")}
    state |= {f"optimizer_{i}": s for i, s in enumerate(checkpoint.pop("optimizer_states", []))}
    folder.mkdir(parents=True)
    with pytest.warns(UserWarning, match="single process"):  # no process group: torch saves on this one
        _distributed_checkpoint_save(state, folder)
    torch.save(checkpoint, folder / "meta.pt")
    return folder


@pytest.fixture
def sharded_run(run_dir: Path, tmp_path: Path) -> Path:
    """A copy of the tiny run whose ``checkpoints/last.ckpt`` is a sharded checkpoint folder, with a
    teacher encoder (the student + 1) besides the student, decoder and optimiser state."""
    run = tmp_path / "sharded_run"
    run.mkdir()
    shutil.copyfile(run_dir / "resolved_config.yaml", run / "resolved_config.yaml")
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    encoder = {k: v for k, v in ckpt["state_dict"].items() if k.startswith("objective.encoder.")}
    ckpt["state_dict"] |= {k.replace("objective.", "objective.teacher.", 1): v + 1 for k, v in encoder.items()}
    write_sharded(ckpt, run / "checkpoints" / "last.ckpt")
    return run


def test_export_reads_a_sharded_checkpoint_folder_and_its_run_folder(run_dir: Path, sharded_run: Path, tmp_path: Path) -> None:
    folder = sharded_run / "checkpoints" / "last.ckpt"
    assert is_sharded_checkpoint(folder) and not is_sharded_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    student = read_checkpoint_state(run_dir / "checkpoints" / "last.ckpt")
    for source, name in ((folder, "from_folder"), (sharded_run, "from_run")):
        out = export_encoder(source, tmp_path / name, weights="student", trust_pickle=True)
        exported = load_file(out / WEIGHTS_NAME)
        assert exported.keys() == student.keys()
        for key, value in student.items():
            assert torch.equal(exported[key], value), key
    teacher = load_file(export_encoder(folder, tmp_path / "teacher", weights="teacher", trust_pickle=True) / WEIGHTS_NAME)
    torch.testing.assert_close(teacher["cls_token"], student["cls_token"] + 1, rtol=0, atol=0)
    auto = export_encoder(folder, tmp_path / "auto", trust_pickle=True)  # the default: the teacher, as a run exports
    torch.testing.assert_close(load_file(auto / WEIGHTS_NAME)["cls_token"], student["cls_token"] + 1, rtol=0, atol=0)
    assert json.loads((auto / CONFIG_NAME).read_text())["exported_weights"] == "teacher"
    assert cli(["export", f"checkpoint={folder}", f"out={tmp_path / 'cli'}", "trust_pickle=true"]) == 0
    assert load_source(folder, trust_pickle=True)[2] == sharded_run.resolve()  # the run folder the config came from


def test_sharded_checkpoints_are_read_only_when_trusted(
    run_dir: Path, sharded_run: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    folder = sharded_run / "checkpoints" / "last.ckpt"
    for source in (folder, sharded_run):  # the run has no encoder/ to fall back to
        with pytest.raises(UnsafeWeightsError, match=rf"{folder} without trust_pickle=True"):
            export_encoder(source, tmp_path / "refused")
    assert cli(["export", f"checkpoint={folder}", f"out={tmp_path / 'cli'}"]) == 1
    shutil.copytree(run_dir / "encoder", sharded_run / "encoder")
    logger = logging.getLogger("ssl_med.export")  # its own handler: a Hydra command may have stopped propagation
    logger.addHandler(caplog.handler)
    try:
        out = export_encoder(sharded_run, tmp_path / "fallback")  # the student of the run's encoder/
    finally:
        logger.removeHandler(caplog.handler)
    assert "read only with trust_pickle=True" in caplog.text
    assert load_file(out / WEIGHTS_NAME).keys() == load_file(run_dir / "encoder" / WEIGHTS_NAME).keys()
    with pytest.raises(UnsafeWeightsError):  # no teacher in encoder/: the refusal, not a fallback
        export_encoder(sharded_run, tmp_path / "teacher", weights="teacher")


def test_only_the_encoder_tensors_of_a_sharded_checkpoint_are_read(sharded_run: Path) -> None:
    folder = sharded_run / "checkpoints" / "last.ckpt"
    keys = sharded_model_keys(folder)
    assert any(k.startswith("objective.decoder") for k in keys)  # the index lists the whole module...
    wanted = [k for k in keys if k.startswith("objective.encoder.")]
    assert read_sharded_tensors(folder, wanted).keys() == set(wanted)  # ...the read takes only these


def test_load_pretrained_takes_a_sharded_checkpoint_when_pickles_are_trusted(run_dir: Path, sharded_run: Path) -> None:
    folder = sharded_run / "checkpoints" / "last.ckpt"
    with pytest.raises(UnsafeWeightsError, match="trust_pickle=True"):
        ssl_med.load_pretrained(folder)
    encoder = ssl_med.load_pretrained(folder, trust_pickle=True)
    student = read_checkpoint_state(run_dir / "checkpoints" / "last.ckpt")
    for key, value in encoder.state_dict().items():  # the encoder the run exports: its teacher (the student + 1)
        assert torch.equal(value, student[key] + 1), key


def test_folders_that_are_no_checkpoint_fail_naming_the_folder(sharded_run: Path, tmp_path: Path) -> None:
    incomplete = sharded_run / "checkpoints" / "step0000002.ckpt"  # a sharded save without its index
    incomplete.mkdir()
    with pytest.raises(ExportError, match=rf"{incomplete}.*no \.metadata"):
        export_encoder(incomplete, tmp_path / "a", trust_pickle=True)
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(ExportError, match=rf"{other} is neither .*sharded checkpoint"):
        load_source(other)


def test_evaluation_points_a_sharded_checkpoint_to_export(sharded_run: Path) -> None:
    folder = sharded_run / "checkpoints" / "last.ckpt"
    for path in (folder, sharded_run):  # the run has no encoder/ (as an interrupted one)
        with pytest.raises(FileNotFoundError, match=rf"ssl_med export checkpoint={path} out="):
            resolve_encoder_dir(path)
