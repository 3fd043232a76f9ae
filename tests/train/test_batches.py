"""objective_and_batches: what `ssl_med pretrain <overrides>` builds, without a trainer."""

from __future__ import annotations

import torch

from ssl_med.train.batches import objective_and_batches


def test_objective_and_real_batches() -> None:
    cfg, objective, batches = objective_and_batches(
        ["objective=mae", "data.batch_size=2", "backbone.depth=1", "data.num_workers=0"], n_batches=2
    )
    assert cfg.objective["name"] == "mae" and len(batches) == 2
    image = batches[0]["image"]
    assert image.shape[0] == 2 and tuple(image.shape[2:]) == tuple(cfg.data.crop_size)
    assert image.std() > 0  # real crops, not zeros
    loss = objective(batches[0]).loss
    assert torch.isfinite(loss)
    _, same, _ = objective_and_batches(["objective=mae", "data.batch_size=2", "backbone.depth=1"], 1)
    torch.testing.assert_close(same.state_dict(), objective.state_dict())  # weights seeded
