"""Every registered backbone learns with MAE, Hi-End-MAE and DINO in 2D and 3D on real demo crops.

A fixed batch of demo crops, a dozen optimiser steps: the loss on that batch falls and the spread of
the embeddings does not shrink below a quarter of what it was at the start (no collapse). Per-objective tests check the loss terms; this
checks that every backbone actually trains under the objectives through the encoder interface.
"""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from ssl_med.data.crops import RandomCropDataset
from ssl_med.registry import BACKBONES, OBJECTIVES

OBJECTIVE_KWARGS = {
    "mae": {"decoder_dim": 32, "decoder_depth": 1, "decoder_heads": 2, "in_chans": 1},
    "hi_end_mae": {"decoder_dim": 32, "decoder_heads": 2, "decoder_self_depth": 1, "levels": [0], "in_chans": 1},
    # KoLeo at the DINOv2 default (0.1): without it, DINO's first steps at this scale can fit an
    # image-independent teacher target (the CLS barely depends on the image at init, the center starts
    # at 0), e.g. ChAda-ViT in 3D and the ViT at seeds 1-4 let the spread fall 0.036 -> 0.004
    "dino": {"out_dim": 64, "hidden_dim": 64, "bottleneck_dim": 32, "views": {"n_local_crops": 2}, "koleo_loss_weight": 0.1,
             "warmup_teacher_temp": 0.07, "freeze_last_layer_steps": 0},
}
CASES = [
    (b, o, d)
    for b in BACKBONES.names()
    for o in OBJECTIVE_KWARGS
    for d in (2, 3)
]


@pytest.mark.parametrize(("backbone", "objective", "spatial_dims"), CASES)
def test_backbone_learns(
    backbone: str, objective: str, spatial_dims: int, demo_store_2d: str, demo_store_3d: str, fit_objective
) -> None:
    torch.manual_seed(0)
    size = (32, 32) if spatial_dims == 2 else (16, 16, 16)
    kwargs = {"spatial_dims": spatial_dims, "img_size": size, "patch_size": 8 if spatial_dims == 2 else 4,
              "embed_dim": 48, "depth": 2}
    if backbone != "chada_vit":
        kwargs["in_chans"] = 1
    encoder = BACKBONES.build(backbone, **kwargs)
    obj = OBJECTIVES.build(objective, encoder=encoder, **OBJECTIVE_KWARGS[objective])
    store = demo_store_2d if spatial_dims == 2 else demo_store_3d
    ds = RandomCropDataset(store, size, num_channels=1, length=16, seed=1, min_foreground=0.3, transform=obj.view_transform())
    batch = next(iter(DataLoader(ds, batch_size=16)))
    opt = torch.optim.AdamW([p for p in obj.parameters() if p.requires_grad], lr=2e-3)

    def same_batch():  # fixed masks per parity: the loss is comparable across steps
        for step in range(12):
            torch.manual_seed(step % 2)
            yield batch

    losses, embeddings = fit_objective(obj, same_batch(), 12, opt)
    spreads = [torch.nn.functional.normalize(e.float(), dim=1).std(dim=0).mean().item() for e in embeddings]
    # DINO's target moves with its EMA teacher, so its loss is not monotone: compare the best later
    # loss with the start (MAE falls steadily and passes the same check with a wide margin)
    assert min(losses[2:]) < 0.85 * sum(losses[:2]) / 2, losses
    assert spreads[-1] > 0.25 * spreads[0] > 0, [round(v, 4) for v in spreads]
