"""The modules an objective keeps in eval mode while training are exactly the ones it declares
(:meth:`Objective.eval_mode_modules`), so the trainer's expected-warning filter matches Lightning's count."""

from __future__ import annotations

import warnings

import pytest
from lightning.pytorch.utilities.warnings import PossibleUserWarning

from ssl_med.build import build_encoder
from ssl_med.registry import OBJECTIVES
from ssl_med.train.run import expect_eval_mode

TINY = {"name": "vit", "spatial_dims": 2, "in_chans": 1, "img_size": 32, "patch_size": 8, "embed_dim": 32,
        "depth": 2, "num_heads": 2}


@pytest.mark.parametrize("name", sorted(OBJECTIVES.names()))
def test_eval_mode_modules_are_the_ones_left_in_eval_mode(name: str) -> None:
    if name == "bm_mae":  # one token per (sequence, patch): the ViT's per-modality tokens
        encoder = build_encoder({**TINY, "in_chans": 2, "channel_tokens": "per_modality"})
        objective = OBJECTIVES.build(name, encoder=encoder, in_chans=2)
    elif OBJECTIVES.get(name).pairing_problem("vit"):  # an objective for channel-adaptive encoders only
        encoder = build_encoder({**TINY, "name": "chada_vit", "in_chans": None, "num_heads": 2})
        objective = OBJECTIVES.build(name, encoder=encoder, in_chans=2)
    else:
        objective = OBJECTIVES.build(name, encoder=build_encoder(TINY))
    declared = sum(1 for module in objective.eval_mode_modules() for _ in module.modules())
    for when in ("as built (what Lightning sees at fit start)", "after train()"):
        in_eval = [n for n, m in objective.named_modules() if not m.training]
        assert len(in_eval) == declared, when
        objective.train()
    if name == "dino":
        assert declared > 0 and all(n.startswith("teacher") for n in in_eval)


def test_only_the_declared_count_is_silenced() -> None:
    objective = OBJECTIVES.build("dino", encoder=build_encoder(TINY))
    count = sum(1 for module in objective.eval_mode_modules() for _ in module.modules())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        expect_eval_mode(objective)
        for n in (count, count + 1):
            warnings.warn(f"Found {n} module(s) in eval mode at the start of training.", PossibleUserWarning, stacklevel=1)
    assert [str(w.message) for w in caught] == [f"Found {count + 1} module(s) in eval mode at the start of training."]
