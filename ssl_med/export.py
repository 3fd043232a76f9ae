"""Portable encoder artefacts: a hub-ready folder that rebuilds the encoder without the training code or config.

An export folder (``ssl_med export checkpoint=... out=DIR``, also written to ``<run dir>/encoder/`` at the
end of every pretraining run) holds::

    model.safetensors     encoder weights only (no objective heads, no teacher, no pickle)
    config.json           everything needed to rebuild and feed the encoder (below)
    README.md             model card: YAML front matter, usage, inputs/outputs, training, evaluation
    eval_results.json     evaluator results found next to the run (if any)
    training_config.yaml  the run's resolved config (if found)

``config.json``::

    {"ssl_med_version", "format_version",
     "backbone": {"name": "vit", ...constructor kwargs...},      # ssl_med.build.build_encoder(backbone) rebuilds it
     "encoder": {spatial_dims, patch_size, embed_dim, depth, in_chans, channel_adaptive, img_size, ...},
     "preprocessing": {input range, intensity normalisation, spacing, crop size, channels},
     "objective": {...}, "data": {...},                          # what it was pretrained with
     "architecture", "model_args", "num_classes", "num_features", "pretrained_cfg",   # timm hub format
     "weights": {"file": "model.safetensors", "sha256": ..., "num_parameters": ...}}

:func:`load_pretrained` reads a folder, a ``model.safetensors`` file or ``hf-hub:ORG/NAME``, verifies the
sha256 of the weights and their shapes against the config, and refuses pickle files unless trusted.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from safetensors.torch import save_file

from ssl_med.build import build_encoder
from ssl_med.encoder import Encoder
from ssl_med.export_target import ExportTargetError, check_export_target
from ssl_med.hub import HF_PREFIX, HubError, download, push_to_hub, timm_fields
from ssl_med.model_card import CARD_NAME, RESULTS_FILES, find_results, results_table, write_model_card  # noqa: F401
from ssl_med.monai_bundle import write_monai_bundle
from ssl_med.version import __version__
from ssl_med.weights import (  # noqa: F401  (re-exported: the names ssl_med.export has always offered)
    CHECKPOINT_PREFIXES,
    CONFIG_NAME,
    PICKLE_SUFFIXES,
    SHARD_INDEX,
    WEIGHTS_NAME,
    ExportError,
    IntegrityError,
    UnsafeWeightsError,
    check_state_dict,
    is_sharded_checkpoint,
    load_pickle_weights,
    load_weights_into,
    read_checkpoint_state,
    read_config,
    read_encoder_weights,
    read_safetensors,
    refuse_pickle,
    refuse_sharded_pickle,
    sha256_file,
    verified_weights,
)

__all__ = [
    "CONFIG_NAME",
    "WEIGHTS_NAME",
    "ExportError",
    "ExportTargetError",
    "HubError",
    "IntegrityError",
    "UnsafeWeightsError",
    "build_config",
    "export_encoder",
    "load_pretrained",
    "load_source",
    "save_encoder",
]

log = logging.getLogger(__name__)

RESULTS_NAME = "eval_results.json"
TRAINING_CONFIG_NAME = "training_config.yaml"
FORMAT_VERSION = 1


# --------------------------------------------------------------------------------------------------
# config.json
# --------------------------------------------------------------------------------------------------
def describe_encoder(encoder: Encoder) -> dict[str, Any]:
    """Shape facts of a built encoder (for config.json and the model card)."""
    grid = getattr(encoder, "base_grid", None)
    depth = encoder.depth
    return {
        "spatial_dims": encoder.spatial_dims,
        "patch_size": list(encoder.patch_size),
        "embed_dim": encoder.embed_dim,
        "depth": depth,
        "in_chans": encoder.in_chans,
        "channel_adaptive": encoder.in_chans is None,
        "img_size": [g * p for g, p in zip(grid, encoder.patch_size)] if grid else None,
        "num_prefix_tokens": getattr(encoder, "num_prefix_tokens", 0),
        "pooling": getattr(encoder, "pooling", None),
        # four evenly spaced blocks, the usual UNETR skip connections (encoder(x, return_layers=...))
        "hidden_state_layers": sorted({max(0, depth * k // 4 - 1) for k in (1, 2, 3, 4)}),
        "num_parameters": sum(p.numel() for p in encoder.parameters()),
    }


def _store_spacing(data: Mapping[str, Any], spatial_dims: int) -> dict[str, Any] | None:
    """Median and range of voxel spacing in the pretraining store, when it is a readable local store."""
    store = data.get("store")
    if not store or "://" in str(store) or not Path(str(store)).exists():
        return None
    try:
        from ssl_med.data.store import ImageStore

        metas = list(ImageStore(str(store)).manifest.values())
    except Exception as err:  # an unreadable store must not block an export
        log.warning("could not read spacings from %s: %s", store, err)
        return None
    spacings = [m.spacing for m in metas if len(m.spacing) >= spatial_dims]
    if not spacings:
        return None
    axes = list(zip(*[s[-spatial_dims:] for s in spacings]))
    return {
        "median_mm": [statistics.median(a) for a in axes],
        "min_mm": [min(a) for a in axes],
        "max_mm": [max(a) for a in axes],
        "num_images": len(spacings),
    }


#: how crops were scaled to [0, 1] under each ``data.intensity_window`` (:func:`ssl_med.data.intensity.intensity_window`)
_PERCENTILES = {
    "method": "percentile",
    "lower_percentile": 0.5,
    "upper_percentile": 99.5,
    "scope": "per image and channel",
    "formula": "clip((x - p0.5) / (p99.5 - p0.5), 0, 1); NaN -> 0",
}
_DTYPE_RANGE = {
    "method": "dtype_range",
    "scope": "every image on one scale",
    "formula": "(x - dtype min) / (dtype max - dtype min), i.e. x / 255 for 8-bit images",
}


def intensity_normalisation(window: str) -> dict[str, Any]:
    """The ``preprocessing.intensity_normalisation`` record of a ``data.intensity_window`` mode."""
    if window == "dtype":
        return {**_DTYPE_RANGE, "intensity_window": window}
    if window == "auto":
        return {
            **_PERCENTILES, "intensity_window": window, "method": "dtype_range_or_percentile", "scope": "8-bit images: one scale; others: per image and channel",
            "formula": f"8-bit images: x / 255; others: {_PERCENTILES['formula']}",
        }  # fmt: skip
    return {**_PERCENTILES, "intensity_window": "image"}


def preprocessing_info(encoder: Encoder, data: Mapping[str, Any] | None) -> dict[str, Any]:
    """What an input must look like: the pretraining crops' intensity scaling, spacing, size and channels."""
    data = dict(data or {})
    channels = encoder.in_chans
    info: dict[str, Any] = {
        "input_range": [0.0, 1.0],
        "intensity_normalisation": intensity_normalisation(str(data.get("intensity_window") or "image")),
        "mean": [0.0] * (channels or 1),  # nothing to subtract after the scaling above
        "std": [1.0] * (channels or 1),
        "spacing": {
            "resampled": False,
            "note": "crops were taken at the stored voxel spacing (no resampling); feed images at a similar spacing",
        },
        "crop_size": list(data["crop_size"]) if data.get("crop_size") else None,
        "num_channels": channels,
        "channel_handling": (
            "any number of named channels (channel-adaptive)"
            if channels is None
            else "colour/multi-channel images averaged to one channel"
            if channels == 1
            else f"{channels} channels; one-channel images repeated"
        ),
    }
    if encoder.spatial_dims == 2 and data.get("spatial_dims", 2) == 2:
        info["slice_axis"] = data.get("slice_axis", 0)  # 2D slices of volumes are taken along this axis
    spacing = _store_spacing(data, encoder.spatial_dims)
    if spacing:
        info["spacing"].update(spacing)
    return info


def _public_data(data: Mapping[str, Any] | None) -> dict[str, Any]:
    """The data config without local paths (a store path may name a machine, a user or a patient cohort)."""
    out = dict(data or {})
    if out.get("store"):
        out["store"] = Path(str(out["store"]).rstrip("/")).name
    return out


def build_config(encoder: Encoder, config: Mapping[str, Any]) -> dict[str, Any]:
    """The full ``config.json`` for ``encoder`` from ``config`` (``backbone`` with its ``name``, optional
    ``objective`` and ``data``; other keys are kept). ``weights`` is filled in by :func:`save_encoder`."""
    backbone = dict(config.get("backbone") or {})
    if "name" not in backbone:
        raise ExportError("config['backbone'] must name the registered backbone")
    extra = {k: v for k, v in config.items() if k not in ("backbone", "objective", "data", "weights")}
    if backbone.get("init_from"):  # the exported weights supersede it, and the file is not on the user's disk
        extra["initialised_from"] = str(backbone["init_from"])
        backbone["init_from"] = None
    return {
        "ssl_med_version": __version__,
        "format_version": FORMAT_VERSION,
        "backbone": backbone,
        "encoder": describe_encoder(encoder),
        "preprocessing": preprocessing_info(encoder, config.get("data")),
        "objective": dict(config.get("objective") or {}),
        "data": _public_data(config.get("data")),
        **timm_fields(backbone, encoder),
        **extra,
    }


def _atomic_write(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def save_encoder(
    encoder: Encoder,
    out_dir: str | Path,
    config: dict[str, Any],
    *,
    model_card: bool = True,
    card_options: Mapping[str, Any] | None = None,
) -> Path:
    """Write ``encoder``'s weights, its ``config.json`` (see the module docstring) and a model card to ``out_dir``.

    ``config`` must contain ``backbone`` with its registered ``name`` (the constructor kwargs that built
    ``encoder``); ``objective`` and ``data`` describe the pretraining. ``card_options`` are passed to
    :func:`write_model_card` (``license``, ``datasets``, ``repo_id``, ``results``); the licence defaults
    to the data config's (:func:`resolve_license`).
    """
    options = dict(card_options or {})
    options["license"] = resolve_license(options.get("license"), config.get("data"))
    full = build_config(encoder, config)
    if options["license"] != "unknown":
        full["pretrained_cfg"]["license"] = options["license"]  # timm's field for it
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous().cpu() for k, v in encoder.state_dict().items()}
    metadata = {"format": "pt", "backbone": str(full["backbone"]["name"]), "ssl_med_version": full["ssl_med_version"]}
    weights = out / WEIGHTS_NAME
    _atomic_write(weights, lambda tmp: save_file(state, tmp, metadata=metadata))
    full["weights"] = {
        "file": WEIGHTS_NAME,
        "format": "safetensors",
        "sha256": sha256_file(weights),
        "num_tensors": len(state),
        "num_parameters": full["encoder"]["num_parameters"],
    }
    text = json.dumps(full, indent=2, default=str) + "\n"
    _atomic_write(out / CONFIG_NAME, lambda tmp: tmp.write_text(text))
    if model_card:
        write_model_card(out, full, **options)
    return out


# --------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------
def _resolve(
    path: str | Path, revision: str | None, cache_dir: str | Path | None, trust_pickle: bool
) -> Path:
    if isinstance(path, str) and path.startswith(HF_PREFIX):
        return download(path, revision=revision, cache_dir=cache_dir, trust_pickle=trust_pickle)
    resolved = Path(path)
    if not resolved.exists():
        raise FileNotFoundError(f"{resolved} not found (for a hub repository use 'hf-hub:ORG/NAME')")
    return resolved


def load_pretrained(
    path: str | Path,
    *,
    trust_pickle: bool = False,
    verify: bool = True,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
) -> Encoder:
    """Rebuild an exported encoder and load its weights; returns it in eval mode, ready for ``forward``.

    Args:
        path: an export folder, its ``model.safetensors``, or ``"hf-hub:ORG/NAME[@revision]"`` (downloaded
            with huggingface_hub; ``HF_HUB_OFFLINE=1`` uses the local cache only).
        trust_pickle: allow pickle files (``.pt``/``.pth``/``.ckpt``/``.bin``): a Lightning pretraining
            checkpoint (config from its run folder; a file, or the folder of a sharded run's checkpoint) or
            a folder with ``pytorch_model.bin``. Unpickling can run arbitrary code; without this flag such
            files are refused.
        verify: check the weights' sha256 against ``config.json`` (shapes and keys are always checked).
        revision, cache_dir: for hub repositories.

    The export's ``config.json`` is attached as ``encoder.pretrained_config``.

    Raises:
        IntegrityError: tampered/corrupted weights (sha256) or weights that do not fit the config.
        UnsafeWeightsError: a pickle file without ``trust_pickle=True``.
        ExportError, FileNotFoundError, HubError: missing or malformed files, unreachable hub.
    """
    source = _resolve(path, revision, cache_dir, trust_pickle)
    sharded = is_sharded_checkpoint(source)
    if sharded or (source.is_file() and source.suffix in PICKLE_SUFFIXES):
        if not trust_pickle:
            raise refuse_sharded_pickle(source) if sharded else refuse_pickle(source)
        if sharded or source.suffix == ".ckpt":  # a Lightning pretraining checkpoint: config from its run folder
            encoder, config, _ = load_source(source, trust_pickle=True)
            encoder.pretrained_config = config  # type: ignore[assignment]
            return encoder.eval()
        config = read_config(source.parent)
        state = load_pickle_weights(source)
        origin = source
    else:
        folder = source.parent if source.is_file() else source
        config = read_config(folder)
        recorded = str((config.get("weights") or {}).get("file", WEIGHTS_NAME))
        if source.is_dir() and not (folder / recorded).is_file() and trust_pickle:
            pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
            if pickles:
                return load_pretrained(pickles[0], trust_pickle=True)
        if source.is_file() and source.suffix != ".safetensors":
            raise ExportError(f"{source}: unsupported weights format {source.suffix!r} (expected .safetensors)")
        if source.is_file() and source.name != recorded:
            origin = source  # another safetensors file next to the config: keys and shapes are still checked
        else:
            origin = verified_weights(folder, config, verify)
        state = read_safetensors(origin)
    encoder = build_encoder(config["backbone"], weights=state, origin=str(origin))
    encoder.pretrained_config = config  # type: ignore[assignment]
    return encoder.eval()


# --------------------------------------------------------------------------------------------------
# export from a run
# --------------------------------------------------------------------------------------------------
def find_run_dir(path: Path) -> Path | None:
    """The pretraining run folder (holding ``resolved_config.yaml``) that ``path`` belongs to, if any."""
    path = path.resolve()
    for candidate in (path, *list(path.parents)[:2]):
        if (candidate / "resolved_config.yaml").is_file():
            return candidate
    return None


def load_training_config(run_dir: Path) -> dict[str, Any]:
    from omegaconf import OmegaConf

    cfg = OmegaConf.to_container(OmegaConf.load(run_dir / "resolved_config.yaml"), resolve=True)
    if not isinstance(cfg, dict) or "backbone" not in cfg:
        raise ExportError(f"{run_dir / 'resolved_config.yaml'} has no 'backbone' section")
    return {"backbone": cfg["backbone"], "objective": cfg.get("objective", {}), "data": cfg.get("data", {})}


def load_source(
    checkpoint: str | Path,
    *,
    weights: Literal["auto", "student", "teacher"] = "auto",
    trust_pickle: bool = False,
) -> tuple[Encoder, dict[str, Any], Path | None]:
    """Encoder, its (training) config and run folder from a run folder, a ``.ckpt`` or an export folder.

    A ``.ckpt`` is a file, or under ``trainer=fsdp`` a folder of shards, read on this process alone and
    only with ``trust_pickle=True`` (:func:`ssl_med.weights.read_checkpoint_state`). A run folder exports
    ``checkpoints/last.ckpt`` (the latest state, even for an interrupted run) and falls back to its
    ``encoder/`` folder, also for a sharded ``last.ckpt`` that is not trusted (with a warning) when ``encoder/``
    holds the ``weights`` asked for. ``weights="auto"`` is the EMA teacher where the checkpoint holds one, else
    the student: the encoder the run itself exports (``Objective.eval_encoder``). The config returned records
    which one was read (``exported_weights``).
    """
    path = Path(checkpoint)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint={path}: no such file or folder (a run folder, a .ckpt or an export folder)")
    if path.is_dir() and not (is_sharded_checkpoint(path) or path.suffix == ".ckpt"):
        if (path / CONFIG_NAME).is_file():
            held = exported_weights(path)
            if weights not in ("auto", held):
                raise ExportError(f"{path} is an export folder (the {held} encoder only); export the run's .ckpt for {weights}")
            encoder = load_pretrained(path, trust_pickle=trust_pickle)
            config = {k: v for k, v in encoder.pretrained_config.items() if k in ("backbone", "objective", "data")}  # type: ignore[union-attr]
            return encoder, {**config, "exported_weights": held}, find_run_dir(path.parent)
        last, export_dir = path / "checkpoints" / "last.ckpt", path / "encoder"
        untrusted_shards = last.is_dir() and not trust_pickle
        exported = (export_dir / CONFIG_NAME).is_file() and weights in ("auto", exported_weights(export_dir))
        if last.exists() and not (untrusted_shards and exported):
            path = last  # a file, or a sharded checkpoint's folder (refused below unless trusted)
        elif (export_dir / CONFIG_NAME).is_file():
            if untrusted_shards:
                log.warning("%s is a sharded checkpoint, read only with trust_pickle=True; exporting %s (the encoder "
                            "at the end of the run's last pretraining) instead", last, export_dir)  # fmt: skip
            return load_source(export_dir, weights=weights, trust_pickle=trust_pickle)
        else:
            raise ExportError(
                f"{path} is neither a pretraining run folder (checkpoints/last.ckpt), a sharded checkpoint "
                f"folder (with the {SHARD_INDEX} index of torch.distributed.checkpoint) nor an export folder"
            )
    if path.suffix == ".safetensors":
        return load_source(path.parent, weights=weights, trust_pickle=trust_pickle)
    if path.is_file() and path.suffix not in (".ckpt", ".pt", ".pth"):
        raise ExportError(f"{path}: expected a Lightning .ckpt, a run folder or an export folder")
    run_dir = find_run_dir(path.parent)
    if run_dir is None:
        raise ExportError(
            f"no resolved_config.yaml found for {path}: the checkpoint must sit in <run dir>/checkpoints/ of an "
            "ssl_med pretraining run (its config says which backbone to build)"
        )
    config = load_training_config(run_dir)
    state, chosen = read_encoder_weights(path, weights=weights, trust_pickle=trust_pickle)
    encoder = build_encoder(config["backbone"], weights=state, origin=str(path))
    return encoder.eval(), {**config, "exported_weights": chosen}, run_dir


def exported_weights(export_dir: Path) -> str:
    """Which encoder an export folder holds (``config.json``'s ``exported_weights``; folders written before it
    was recorded hold the student)."""
    return read_config(export_dir).get("exported_weights", "student")


def resolve_license(license: str | None, data: Mapping[str, Any] | None) -> str:
    """The model card's licence: ``license`` if given, else the data config's ``license`` (the terms the
    pretraining data came with, e.g. ``data.license=cc-by-4.0``), else ``"unknown"``."""
    for candidate in (license, (data or {}).get("license")):
        if candidate and str(candidate).strip() and str(candidate) != "None":
            return str(candidate).strip()
    return "unknown"


def export_encoder(
    checkpoint: str | Path,
    out: str | Path,
    *,
    weights: Literal["auto", "student", "teacher"] = "auto",
    license: str | None = None,
    datasets: Sequence[str] | None = None,
    push_to: str | None = None,
    private: bool = False,
    token: str | None = None,
    trust_pickle: bool = False,
    overwrite: bool = False,
    format: Literal["ssl_med", "monai_bundle"] = "ssl_med",
) -> Path:
    """Write a hub-ready export folder from a run folder, a Lightning checkpoint or an export folder.

    ``out`` must be new, empty or a previous ssl_med export unless ``overwrite=True``, and ``push_to``
    a hub repository id; both are checked before anything is read or written
    (:func:`ssl_med.export_target.check_export_target`, raising :class:`ExportTargetError`).

    Evaluator results found in the run folder (``results.json``/``eval_results.json``, with a sibling
    ``.md`` table if present) go into the model card and ``eval_results.json``; the run's resolved config
    is copied as ``training_config.yaml``. With ``push_to=ORG/NAME`` the folder is then uploaded; a
    :class:`HubError` (offline, no token) is raised only after the local export is complete.

    ``license`` defaults to the data config's ``license`` (``data.license``), else ``unknown``
    (:func:`resolve_license`). ``format="monai_bundle"`` writes a MONAI bundle instead
    (:mod:`ssl_med.monai_bundle`; no hub upload).
    """
    if format not in ("ssl_med", "monai_bundle"):
        raise ExportError(f"format={format!r}: choose ssl_med or monai_bundle")
    if format == "monai_bundle" and push_to:
        raise ExportError("push_to= uploads ssl_med exports; a MONAI bundle is shared as its folder (or a zip of it)")
    out = check_export_target(out, push_to, overwrite)
    encoder, config, run_dir = load_source(checkpoint, weights=weights, trust_pickle=trust_pickle)
    results = find_results(run_dir)
    license = resolve_license(license, config.get("data"))
    card_options = {"license": license, "datasets": datasets, "repo_id": push_to, "results": results}
    if format == "monai_bundle":
        options = {k: v for k, v in card_options.items() if k != "license"}
        return write_monai_bundle(encoder, out, build_config(encoder, config), license=license, card_options=options)
    save_encoder(encoder, out, config, card_options=card_options)
    results_file = out / RESULTS_NAME
    if results:
        merged = results[0][1] if len(results) == 1 else {str(p.relative_to(run_dir)): d for p, d, _ in results}  # type: ignore[arg-type]
        results_file.write_text(json.dumps(merged, indent=2, default=str) + "\n")
    else:
        results_file.unlink(missing_ok=True)  # never leave a previous export's results behind
    if run_dir is not None and (run_dir / "resolved_config.yaml").is_file():
        shutil.copyfile(run_dir / "resolved_config.yaml", out / TRAINING_CONFIG_NAME)
    if push_to:
        push_to_hub(out, push_to, token=token, private=private)
    return out
