"""An encoder as a MONAI bundle (``ssl_med export format=monai_bundle``), loaded by ``monai.bundle``.

The layout is MONAI's bundle specification::

    configs/metadata.json    version, changelog, package versions, task, network_data_format (inputs/outputs)
    configs/inference.json   network_def (ssl_med.feature_model.FeatureModel from the backbone config), device,
                             checkpoint, load (weights into the network), inferer
    models/model.pt          the network's state dict (tensors only: torch.load(weights_only=True) reads it)
    docs/README.md           the model card
    LICENSE                  when the licence is known

``network_def`` returns the pooled embedding ``(B, D)`` (``encoder(x).pooled``), so MONAI inferers
and engines can run it; ``forward_features`` gives the tokens. Loading, with MONAI alone (ssl_med
installed so the ``_target_`` resolves)::

    model = monai.bundle.load("NAME", bundle_dir="PARENT", workflow_type="inference", device="cpu")

or ``ConfigParser`` on ``configs/inference.json`` with ``bundle_root`` set, then ``load``.
"""

from __future__ import annotations

import json
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ssl_med.encoder import Encoder
from ssl_med.feature_model import FeatureModel
from ssl_med.model_card import write_model_card

BUNDLE_VERSION = "0.1.0"
#: MONAI's bundle metadata schema (the model zoo's)
METADATA_SCHEMA = (
    "https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/meta_schema_20240725.json"
)


def _versions() -> dict[str, str]:
    import monai
    import numpy

    return {"monai_version": monai.__version__, "pytorch_version": torch.__version__.split("+")[0],
            "numpy_version": numpy.__version__}


def metadata(config: Mapping[str, Any], license: str) -> dict[str, Any]:
    """``configs/metadata.json``: MONAI's required fields and the network's inputs/outputs."""
    enc, prep = config["encoder"], config["preprocessing"]
    objective = (config.get("objective") or {}).get("name", "unknown")
    data = (config.get("data") or {}).get("name", "unknown")
    channels = enc["in_chans"] or 1
    spatial = enc["img_size"] or prep.get("crop_size") or [s * 4 for s in enc["patch_size"]]
    axes = ["*"] * len(spatial) if enc["img_size"] is None else spatial
    return {
        "schema": METADATA_SCHEMA,
        "version": BUNDLE_VERSION,
        "changelog": {BUNDLE_VERSION: f"exported by ssl_med {config['ssl_med_version']}"},
        **_versions(),
        "required_packages_version": {"ssl_med": str(config["ssl_med_version"])},
        "name": f"ssl_med {config['backbone']['name']} {enc['spatial_dims']}D {objective} encoder",
        "task": "image feature extraction (self-supervised pretrained encoder)",
        "description": (
            f"A {enc['spatial_dims']}D {config['backbone']['name']} encoder pretrained with {objective} on {data} "
            "data by ssl_med. The network returns the pooled embedding; forward_features returns the tokens."
        ),
        "authors": "ssl_med export",
        "copyright": "see LICENSE" if license != "unknown" else "unknown",
        "license": license,
        "data_source": str(data),
        "data_type": "image",
        "intended_use": "Research feature extraction and fine-tuning; not for clinical use.",
        "platform": platform.system(),
        "network_data_format": {
            "inputs": {
                "image": {
                    "type": "image",
                    "format": "magnitude",
                    "modality": "any",
                    "num_channels": channels,
                    "spatial_shape": axes,
                    "dtype": "float32",
                    "value_range": prep["input_range"],
                    "is_patch_data": True,
                    "channel_def": {str(i): f"channel {i}" for i in range(channels)},
                }
            },
            "outputs": {
                "pred": {
                    "type": "embedding",
                    "format": "features",
                    "num_channels": enc["embed_dim"],
                    "spatial_shape": [],
                    "dtype": "float32",
                    "value_range": [],
                    "is_patch_data": False,
                    "channel_def": {},
                }
            },
        },
        "ssl_med": {k: config[k] for k in ("backbone", "encoder", "preprocessing", "objective", "data") if k in config},
    }


def inference_config(backbone: Mapping[str, Any]) -> dict[str, Any]:
    """``configs/inference.json``: MONAI config syntax (``_target_``, ``@`` references, ``$`` expressions)."""
    return {
        "imports": ["$import torch"],
        "bundle_root": ".",
        "device": "$torch.device('cuda:0' if torch.cuda.is_available() else 'cpu')",
        "network_def": {"_target_": "ssl_med.feature_model.FeatureModel", "backbone": dict(backbone)},
        "network": "$@network_def.to(@device).eval()",
        "checkpoint": "$@bundle_root + '/models/model.pt'",
        "load": "$@network.load_state_dict(torch.load(@checkpoint, map_location=@device, weights_only=True))",
        "inferer": {"_target_": "SimpleInferer"},
    }


def _monai_usage(name: str) -> str:
    return "\n".join([
        "## MONAI bundle",
        "",
        "```python",
        "import monai",
        "",
        f'model = monai.bundle.load("{name}", bundle_dir="PARENT_FOLDER", workflow_type="inference", device="cpu")',
        "features = model(x)  # (B, D) pooled embedding; model.forward_features(x) gives the tokens",
        "```",
        "",
        "`network_def` needs `pip install ssl_med` (its `_target_` is `ssl_med.feature_model.FeatureModel`).",
        "",
    ])


def write_monai_bundle(
    encoder: Encoder,
    out: str | Path,
    config: Mapping[str, Any],
    *,
    license: str = "unknown",
    card_options: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``encoder`` (built from ``config["backbone"]``; ``config`` is a full ``config.json`` from
    :func:`ssl_med.export.build_config`) as a MONAI bundle in ``out``; returns ``out``."""
    out = Path(out)
    for sub in ("configs", "models", "docs"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    backbone = {**config["backbone"], "init_from": None} if "init_from" in config["backbone"] else config["backbone"]
    network = FeatureModel(encoder)
    state = {k: v.detach().contiguous().cpu() for k, v in network.state_dict().items()}
    torch.save(state, out / "models" / "model.pt")
    (out / "configs" / "metadata.json").write_text(json.dumps(metadata(config, license), indent=2, default=str) + "\n")
    (out / "configs" / "inference.json").write_text(json.dumps(inference_config(backbone), indent=2) + "\n")
    card = write_model_card(out / "docs", config, license=license, **dict(card_options or {}))
    card.write_text(card.read_text() + "\n" + _monai_usage(out.name))
    licence_file = out / "LICENSE"
    if license != "unknown":
        licence_file.write_text(
            f"This model is released under the licence with SPDX / Hugging Face id '{license}'.\n"
            "Its terms apply together with those of the data it was pretrained on (see docs/README.md).\n"
        )
    else:
        licence_file.unlink(missing_ok=True)
    return out
