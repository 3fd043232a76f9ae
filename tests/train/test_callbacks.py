"""Image previews: one grid row per image and channel, channel names in the log and TensorBoard text."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from ssl_med.train.callbacks import PreviewImages, _preview_grid, _preview_rows


def _scaled(x: torch.Tensor) -> torch.Tensor:
    """``(H, W)`` scaled to ``[0, 1]`` as a preview tile."""
    return (x - x.min()) / (x.max() - x.min()).clamp_min(1e-6)


def test_single_channel_grid_is_one_grey_row_per_image() -> None:
    gen = torch.Generator().manual_seed(0)
    a, b = torch.rand(3, 1, 8, 6, generator=gen), torch.rand(3, 1, 8, 6, generator=gen)
    grid = _preview_grid({"input": a, "reconstruction": b}, max_items=2)
    assert grid.shape == (3, 16, 12)
    assert torch.equal(grid[0], grid[1]) and torch.equal(grid[0], grid[2])  # grey
    for i in range(2):
        torch.testing.assert_close(grid[0, i * 8 : i * 8 + 8, :6], _scaled(a[i, 0]))
        torch.testing.assert_close(grid[0, i * 8 : i * 8 + 8, 6:], _scaled(b[i, 0]))
    assert _preview_rows({"input": a}, {}) is None


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_four_channel_grid_shows_every_channel(spatial_dims: int) -> None:
    """A 4-channel batch: one row per (image, channel), image-major, each tile that channel's pixels."""
    gen = torch.Generator().manual_seed(1)
    shape = (2, 4, 5, 8, 8) if spatial_dims == 3 else (2, 4, 8, 8)
    x = torch.rand(*shape, generator=gen) * torch.tensor([1.0, 10.0, 100.0, 1000.0]).view(1, 4, *[1] * spatial_dims)
    grid = _preview_grid({"input": x, "masked": x.flip(-1)})
    assert grid.shape == (3, 2 * 4 * 8, 2 * 8)
    plane = x[:, :, 2] if spatial_dims == 3 else x  # 3D: the central slice
    for i in range(2):
        for c in range(4):
            top = (i * 4 + c) * 8
            torch.testing.assert_close(grid[0, top : top + 8, :8], _scaled(plane[i, c]))
            torch.testing.assert_close(grid[0, top : top + 8, 8:], _scaled(plane[i, c].flip(-1)))


def test_channels_beyond_the_cap_are_left_out_and_named() -> None:
    x = torch.rand(1, 6, 4, 4)
    grid = _preview_grid({"input": x}, max_channels=4)
    assert grid.shape == (3, 4 * 4, 4)
    torch.testing.assert_close(grid[0, 12:16], _scaled(x[0, 3]))
    rows = _preview_rows({"input": x}, {}, max_channels=4)
    assert rows == "one row per image and channel: channel 0/channel 1/channel 2/channel 3 (2 more channels not shown)"


def test_rows_are_named_by_the_batch_channel_names() -> None:
    x = torch.rand(2, 4, 4, 4)
    same = {"channel_names": ["t1|t1ce|t2|flair"] * 2}
    assert _preview_rows({"input": x}, same) == "one row per image and channel: t1/t1ce/t2/flair"
    mixed = {"channel_names": ["t1|t1ce|t2|flair", "flair|t2|t1ce|t1"]}
    assert _preview_rows({"input": x}, mixed).endswith("image 0: t1/t1ce/t2/flair; image 1: flair/t2/t1ce/t1")
    placeholder = {"channel_names": ["ch0|ch1|ch2|ch3"] * 2}
    assert "channel 3" in _preview_rows({"input": x}, placeholder)


def test_smaller_images_and_fewer_channels_are_padded_black() -> None:
    glob, local = torch.rand(2, 2, 8, 8), torch.rand(2, 1, 4, 4)  # DINO's global and local crops
    grid = _preview_grid({"global_crop_1": glob, "local_crop_1": local})
    assert grid.shape == (3, 2 * 2 * 8, 16)
    torch.testing.assert_close(grid[0, :4, 8:12], _scaled(local[0, 0]))
    assert grid[0, 4:8, 8:].abs().sum() == 0 and grid[0, 8:16, 8:].abs().sum() == 0


class _Experiment:
    def __init__(self) -> None:
        self.images: list[tuple[str, torch.Tensor, int]] = []
        self.texts: list[tuple[str, str, int]] = []

    def add_image(self, tag: str, image: torch.Tensor, step: int) -> None:
        self.images.append((tag, image, step))

    def add_text(self, tag: str, text: str, step: int) -> None:
        self.texts.append((tag, text, step))


def test_callback_logs_every_channel_and_names_the_rows_once(caplog: pytest.LogCaptureFixture) -> None:
    x = torch.rand(2, 4, 8, 8)
    objective = SimpleNamespace(preview=lambda batch: {"input": batch["image"]})
    experiment = _Experiment()
    trainer: Any = SimpleNamespace(global_step=0, is_global_zero=True, logger=SimpleNamespace(experiment=experiment))
    batch = {"image": x, "channel_names": ["t1|t1ce|t2|flair"] * 2}
    callback = PreviewImages(every_n_steps=1)
    with caplog.at_level(logging.INFO, logger="ssl_med.train.callbacks"):
        for step in (0, 1):
            trainer.global_step = step
            callback.on_train_batch_end(trainer, SimpleNamespace(objective=objective), None, batch, 0)
    assert [tag for tag, _, _ in experiment.images] == ["preview/input"] * 2
    assert experiment.images[0][1].shape == (3, 2 * 4 * 8, 8)
    assert experiment.texts == [("preview/input/rows", "one row per image and channel: t1/t1ce/t2/flair", 0)]
    assert sum("t1/t1ce/t2/flair" in r.getMessage() for r in caplog.records) == 1
