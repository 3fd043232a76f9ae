"""A bad chunk during training is named (``data.on_error=raise``) or skipped, counted and bounded (``skip``)."""

from __future__ import annotations

import logging
import multiprocessing

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from ssl_med.config import DataConfig
from ssl_med.data.crops import RandomCropDataset
from ssl_med.data.datamodule import CropDataModule
from ssl_med.data.faults import MAX_REDRAWS, SKIPPED_KEY, TooManyFaults
from ssl_med.data.integrity import ChunkError
from ssl_med.data.store import ImageStore

CT = "images/ct/0"


@pytest.fixture()
def two_volumes(tiny_store, faults):
    """The tiny store plus a second, intact CT volume ``ct2``; one chunk of ``ct`` is corrupted."""
    ImageStore(tiny_store, mode="a").add("ct2", faults.volume() + 1, (1.0, 1.0, 1.0), modality="CT")
    faults.flip_byte(faults.chunk_files(tiny_store, CT)[-1])  # z, y, x in 8:16
    return tiny_store


def crops(store, on_error: str = "raise", max_error_fraction: float = 0.05) -> RandomCropDataset:
    return RandomCropDataset(store, (8, 8, 8), num_channels=None, length=64, seed=5, on_error=on_error,
                             max_error_fraction=max_error_fraction)  # fmt: skip


def test_worker_error_names_image_and_chunk(tiny_store, faults) -> None:
    for path in faults.chunk_files(tiny_store, CT):
        path.unlink()
    with pytest.raises(ChunkError, match=r"image 'ct': chunk c/0/\d/\d/\d of .*images/ct/0 is missing"):
        crops(tiny_store)[0]
    loader = DataLoader(crops(tiny_store), batch_size=2, num_workers=1,
                        multiprocessing_context=multiprocessing.get_context("spawn"))  # fmt: skip
    with pytest.raises(ChunkError, match=r"image 'ct': chunk c/0/\d/\d/\d of .*images/ct/0 is missing"):
        next(iter(loader))


def test_skip_redraws_deterministically_counts_and_logs(two_volumes, caplog) -> None:
    strict, lenient = crops(two_volumes), crops(two_volumes, "skip", max_error_fraction=1.0)
    failing = []
    with caplog.at_level(logging.WARNING, logger="ssl_med.data.faults"):
        for i in range(len(strict)):
            try:
                expected = strict[i]["image"]
            except ChunkError:
                failing.append(i)
                lenient[i]  # redrawn
                continue
            torch.testing.assert_close(lenient[i]["image"], expected)  # good samples are untouched
    assert failing and lenient.faults.skipped >= len(failing)
    assert lenient.faults.draws == len(strict) + lenient.faults.skipped
    assert (
        sum("image 'ct': chunk c/0/1/1/1" in r.getMessage() for r in caplog.records) == lenient.faults.skipped
    )
    again = crops(two_volumes, "skip", max_error_fraction=1.0)
    for i in failing:
        np.testing.assert_array_equal(again[i]["image"].numpy(), lenient[i]["image"].numpy())


def test_skip_stops_the_run_beyond_the_allowed_fraction(two_volumes) -> None:
    ds = crops(two_volumes, "skip", max_error_fraction=0.05)
    with pytest.raises(TooManyFaults, match=r"3 of \d+ draws failed, more than data.max_error_fraction=0.05"):
        for i in range(len(ds)):
            ds[i]


def test_skip_stops_when_no_draw_succeeds(tiny_store, faults) -> None:
    for path in faults.chunk_files(tiny_store, CT):
        path.unlink()
    with pytest.raises(TooManyFaults, match=f"sample 0: {MAX_REDRAWS} draws in a row failed.*image 'ct'"):
        crops(tiny_store, "skip", max_error_fraction=1.0)[0]


def test_data_config_reaches_the_dataset(tiny_store) -> None:
    cfg = DataConfig(
        source="store", store=str(tiny_store), spatial_dims=3, crop_size=[8, 8, 8], on_error="skip"
    )
    module = CropDataModule(cfg, view_transform=lambda x: x)
    module.setup()
    assert (module.dataset.faults.on_error, module.dataset.faults.max_error_fraction) == ("skip", 0.05)
    with pytest.raises(ValueError, match=r"data\.on_error must be one of"):
        CropDataModule(DataConfig(source="store", store=str(tiny_store), spatial_dims=3, crop_size=[8, 8, 8],
                                  on_error="ignore"), view_transform=lambda x: x).setup()  # fmt: skip


def test_skip_counts_travel_with_the_batch_from_spawned_workers(two_volumes) -> None:
    counted = crops(two_volumes, "skip", max_error_fraction=1.0)
    for i in range(len(counted)):
        counted[i]
    assert counted.faults.skipped > 0
    loader = DataLoader(crops(two_volumes, "skip", max_error_fraction=1.0), batch_size=8, num_workers=2,
                        multiprocessing_context=multiprocessing.get_context("spawn"))  # fmt: skip
    per_batch = [batch[SKIPPED_KEY] for batch in loader]
    assert all(b.shape == (8,) for b in per_batch)
    assert int(sum(b.sum() for b in per_batch)) == counted.faults.skipped
    assert SKIPPED_KEY not in crops(two_volumes)[1]  # on_error=raise: batches as before


def test_skipped_samples_reach_tensorboard(two_volumes, tmp_path, caplog) -> None:
    from hydra import compose, initialize_config_module
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from ssl_med.config import parse_pretrain_config
    from ssl_med.train import run as run_module

    overrides = ["data=store", f"data.store={two_volumes}", "data.spatial_dims=3", "data.crop_size=[16,16,16]",
                 "data.on_error=skip", "data.max_error_fraction=1.0", "data.batch_size=4", "data.num_workers=0",
                 "data.samples_per_epoch=64", "trainer.max_steps=3", "trainer.log_every_n_steps=1",
                 "trainer.progress_bar=false",
                 "backbone.embed_dim=48", "backbone.depth=1", "objective.decoder_dim=16",
                 "objective.decoder_depth=1", "objective.decoder_heads=2"]  # fmt: skip
    with initialize_config_module(config_module="ssl_med.conf", version_base="1.3"):
        cfg = parse_pretrain_config(compose(config_name="pretrain", overrides=overrides))
    with caplog.at_level(logging.WARNING, logger="ssl_med.data.faults"):
        run_module.pretrain(cfg, tmp_path / "run")
    logged = sum("draw" in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)
    acc = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    acc.Reload()
    totals = [e.value for e in acc.Scalars("data/skipped_samples")]
    assert len(totals) == 3 and totals == sorted(totals)
    assert logged > 0 and totals[-1] == logged  # the run log and TensorBoard agree
    fraction = acc.Scalars("data/skipped_fraction")[-1].value
    assert fraction == pytest.approx(logged / (3 * 4 + logged))


def test_skip_totals_survive_a_resume() -> None:
    from types import SimpleNamespace

    from ssl_med.train.module import PretrainModule

    before, after, checkpoint = SimpleNamespace(data_draws=40, skipped_draws=3), SimpleNamespace(), {}
    PretrainModule.on_save_checkpoint(before, checkpoint)
    PretrainModule.on_load_checkpoint(after, checkpoint)
    assert (after.data_draws, after.skipped_draws) == (40, 3)
    PretrainModule.on_load_checkpoint(after, {})  # a checkpoint from before the counts
    assert (after.data_draws, after.skipped_draws) == (0, 0)
