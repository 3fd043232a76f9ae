"""Portable encoder artefacts: ``model.safetensors`` (encoder weights only) + ``config.json``.

``config.json`` holds everything needed to rebuild the network without the training config::

    {"ssl_med_version": ..., "backbone": {"name": "vit", ...constructor kwargs...},
     "objective": {...}, "data": {...}}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from ssl_med.encoder import Encoder
from ssl_med.registry import BACKBONES

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"


def save_encoder(encoder: Encoder, out_dir: str | Path, config: dict[str, Any]) -> Path:
    """Write ``encoder``'s weights and ``config`` (must contain ``backbone`` with its ``name``) to ``out_dir``."""
    from ssl_med import __version__

    if "name" not in config.get("backbone", {}):
        raise ValueError("config['backbone'] must name the registered backbone")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in encoder.state_dict().items()}
    save_file(state, out / WEIGHTS_NAME, metadata={"format": "pt", "backbone": config["backbone"]["name"]})
    (out / CONFIG_NAME).write_text(json.dumps({"ssl_med_version": __version__, **config}, indent=2, default=str))
    return out


def load_pretrained(path: str | Path) -> Encoder:
    """Rebuild an encoder from a folder written by :func:`save_encoder` and load its weights (strict)."""
    folder = Path(path)
    config_file, weights_file = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for f in (config_file, weights_file):
        if not f.is_file():
            raise FileNotFoundError(f"{f} not found: expected an ssl_med export folder")
    config = json.loads(config_file.read_text())
    kwargs = dict(config["backbone"])
    encoder = BACKBONES.build(kwargs.pop("name"), **kwargs)
    missing, unexpected = encoder.load_state_dict(load_file(weights_file), strict=False)
    if missing or unexpected:
        raise ValueError(
            f"{weights_file} does not match the backbone in {config_file}: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    return encoder.eval()
