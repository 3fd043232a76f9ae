"""Reading and checking encoder weights: export folders, safetensors files, pickles, Lightning checkpoints.

Everything that turns files into a state dict and decides whether it may be loaded lives here, below
both :mod:`ssl_med.export` (which writes exports) and :mod:`ssl_med.hub` (which downloads them and
serves them to timm), so that neither imports the other for it:

* :func:`verified_weights` / :func:`load_weights_into`: an export folder's ``model.safetensors``,
  checked against the sha256 its ``config.json`` records;
* :func:`check_state_dict`: keys and shapes against the encoder the config describes;
* pickle files (``.pt``/``.pth``/``.ckpt``/``.bin``) are refused unless the caller trusts them
  (:class:`UnsafeWeightsError`); :func:`read_checkpoint_state` reads Lightning checkpoints with the
  weights-only unpickler.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor, nn

log = logging.getLogger(__name__)

WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")
#: Lightning module keys of the encoder, per choice of ``weights``
CHECKPOINT_PREFIXES = {"student": "objective.encoder.", "teacher": "objective.teacher.encoder."}


class ExportError(ValueError):
    """An export folder or checkpoint that cannot be written or read (missing files, wrong layout)."""


class IntegrityError(ExportError):
    """Weights that do not match their config: wrong sha256 (tampered/corrupted) or wrong shapes."""


class UnsafeWeightsError(ValueError):
    """A pickle-based weights file was offered without ``trust_pickle=True``."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file, read in ``chunk``-byte blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def state_dict_mismatch(
    target: Mapping[str, Tensor], state: Mapping[str, Tensor], optional: Sequence[str] = ()
) -> str | None:
    """What keeps ``state`` from loading into a module with state dict ``target``, or ``None`` if it fits.

    Lists shape mismatches, missing keys (except ``optional`` ones) and unexpected keys, a few of each.
    """
    shapes = [
        f"{k}: weights {tuple(v.shape)} vs model {tuple(target[k].shape)}"
        for k, v in state.items()
        if k in target and tuple(v.shape) != tuple(target[k].shape)
    ]
    missing = sorted(set(target) - set(state) - set(optional))
    unexpected = sorted(set(state) - set(target))
    parts = [
        f"{len(shapes)} shape mismatch(es), e.g. {shapes[:3]}" if shapes else "",
        f"{len(missing)} missing key(s), e.g. {missing[:5]}" if missing else "",
        f"{len(unexpected)} unexpected key(s), e.g. {unexpected[:5]}" if unexpected else "",
    ]
    return "; ".join(p for p in parts if p) or None


def refuse_pickle(path: Path) -> UnsafeWeightsError:
    """The error raised for a pickle file offered without ``trust_pickle=True``."""
    return UnsafeWeightsError(
        f"refusing to load {path}: it is a pickle file, and unpickling can run arbitrary code. Use the "
        f"{WEIGHTS_NAME} of an ssl_med export, or pass trust_pickle=True if you trust where this file came from"
    )


def check_state_dict(encoder: nn.Module, state: Mapping[str, Tensor], origin: str) -> None:
    """Raise :class:`IntegrityError` listing missing/unexpected keys and shape mismatches."""
    problems = state_dict_mismatch(encoder.state_dict(), state)
    if problems:
        raise IntegrityError(f"{origin} does not fit the {type(encoder).__name__} its config describes: {problems}")


def verified_weights(folder: Path, config: Mapping[str, Any], verify: bool) -> Path:
    """The weights file of export ``folder`` (as its ``config`` names it), its sha256 checked against the
    recorded one when ``verify``; :class:`IntegrityError` if they differ."""
    weights = folder / str((config.get("weights") or {}).get("file", WEIGHTS_NAME))
    if not weights.is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        hint = f" (it has pickle weights {pickles}: pass trust_pickle=True to load those)" if pickles else ""
        raise ExportError(f"{weights} not found: expected an ssl_med export folder{hint}")
    expected = (config.get("weights") or {}).get("sha256")
    if verify and expected:
        actual = sha256_file(weights)
        if actual != expected:
            raise IntegrityError(
                f"{weights} has sha256 {actual} but {folder / CONFIG_NAME} records {expected}: the weights "
                "were modified or corrupted after export (re-download or re-export them)"
            )
    elif verify:
        log.warning("%s records no sha256 (exported by an older ssl_med); integrity not checked", folder / CONFIG_NAME)
    return weights


def read_safetensors(path: Path) -> dict[str, Tensor]:
    """A safetensors file's tensors; an unreadable file is an :class:`IntegrityError`."""
    try:
        return load_file(path)
    except (SafetensorError, OSError) as err:
        raise IntegrityError(f"{path} is not a readable safetensors file: {err}") from err


def read_config(folder: Path) -> dict[str, Any]:
    """An export folder's ``config.json``; it must name its ``backbone``."""
    config_file = folder / CONFIG_NAME
    if not config_file.is_file():
        raise ExportError(f"{config_file} not found: expected an ssl_med export folder")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ExportError(f"{config_file} is not valid JSON: {err}") from err
    if not isinstance(config.get("backbone"), dict) or "name" not in config["backbone"]:
        raise ExportError(f"{config_file} has no 'backbone' with a 'name': not an ssl_med export")
    return config


def load_weights_into(encoder: nn.Module, source: str | Path, *, verify: bool = True) -> nn.Module:
    """Load weights into ``encoder`` from an export folder (sha256-checked) or a ``.safetensors`` file."""
    source = Path(source)
    if source.is_dir():
        path = verified_weights(source, read_config(source), verify)
    elif source.suffix in PICKLE_SUFFIXES:
        raise refuse_pickle(source)
    else:
        path = source
    state = read_safetensors(path)
    check_state_dict(encoder, state, str(path))
    encoder.load_state_dict(state)
    return encoder


def read_checkpoint_state(
    path: Path, *, weights: Literal["student", "teacher"] = "student", trust_pickle: bool = False
) -> dict[str, Tensor]:
    """The encoder's state dict from a Lightning pretraining checkpoint.

    The checkpoint is read with ``torch.load(weights_only=True)`` (tensors and plain containers only, no
    code); ``trust_pickle=True`` allows a full unpickle for checkpoints that need it.
    """
    if weights not in CHECKPOINT_PREFIXES:
        raise ExportError(f"weights must be one of {sorted(CHECKPOINT_PREFIXES)}, got {weights!r}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        if not trust_pickle:
            raise UnsafeWeightsError(
                f"{path} cannot be read with the restricted (weights-only) unpickler: {err}. "
                "Pass trust_pickle=True if you trust this checkpoint"
            ) from err
        ckpt = torch.load(path, map_location="cpu", weights_only=False)
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict):
        raise ExportError(f"{path} holds no state_dict: not an ssl_med pretraining checkpoint")
    prefix = CHECKPOINT_PREFIXES[weights]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    out = {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    if not out:
        roots = sorted({".".join(k.split(".")[:2]) for k in state})
        other = "" if weights == "student" else " (only DINO-style objectives keep a teacher)"
        raise ExportError(f"{path} has no {weights} encoder weights under {prefix!r}{other}; it holds {roots[:8]}")
    return out


def load_pickle_weights(path: Path) -> dict[str, Tensor]:
    """A trusted pickle file's state dict (under ``state_dict`` or ``model`` if nested, ``module.`` removed)."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ExportError(f"{path} holds no state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}
