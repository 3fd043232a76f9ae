"""One way to build an encoder from its config: training, export, evaluation and the hub all call it.

A backbone config block is ``{"name": <registered backbone>, **constructor arguments}`` (the
``backbone`` group of a training config, or the ``backbone`` of an export's ``config.json``)::

    encoder = build_encoder({"name": "vit", "spatial_dims": 3, "in_chans": 1})   # fresh, or from init_from
    encoder = build_encoder(config["backbone"], weights="runs/x/encoder")        # an export folder
    encoder = build_encoder(config["backbone"], weights=state_dict)              # a state dict

``init_from`` (foreign weights to start pretraining from, read by the backbone's constructor) is
honoured only when no ``weights`` are given: given weights replace it, so the starting-point file
is never read (it is usually not on the machine that loads an export).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from ssl_med.encoder import Encoder
from ssl_med.registry import BACKBONES
from ssl_med.weights import check_state_dict, load_weights_into


def build_encoder(
    config: Mapping[str, Any],
    weights: str | Path | Mapping[str, Tensor] | None = None,
    *,
    origin: str | None = None,
) -> Encoder:
    """The encoder ``config`` describes, with ``weights`` loaded if given (train mode, on the CPU).

    Args:
        config: ``{"name": backbone, **kwargs}`` for :data:`~ssl_med.registry.BACKBONES`.
        weights: an export folder (sha256-checked) or ``.safetensors`` file, or a state dict; keys and
            shapes must fit the encoder exactly (:class:`~ssl_med.weights.IntegrityError` otherwise).
        origin: where a state dict came from, for error messages.
    """
    kwargs = dict(config)
    name = kwargs.pop("name")
    if weights is not None and kwargs.get("init_from"):
        kwargs["init_from"] = None
    encoder = BACKBONES.build(name, **kwargs)
    if isinstance(weights, Mapping):
        check_state_dict(encoder, weights, origin or "the given state dict")
        encoder.load_state_dict(weights)
    elif weights is not None:
        load_weights_into(encoder, weights)
    return encoder
