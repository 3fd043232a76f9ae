"""Reading and checking encoder weights: export folders, safetensors files, pickles, Lightning checkpoints.

Everything that turns files into a state dict and decides whether it may be loaded lives here, below
both :mod:`ssl_med.export` (which writes exports) and :mod:`ssl_med.hub` (which downloads them and
serves them to timm), so that neither imports the other for it:

* :func:`verified_weights` / :func:`load_weights_into`: an export folder's ``model.safetensors``,
  checked against the sha256 its ``config.json`` records;
* :func:`check_state_dict`: keys and shapes against the encoder the config describes;
* pickle files (``.pt``/``.pth``/``.ckpt``/``.bin``) are refused unless the caller trusts them
  (:class:`UnsafeWeightsError`); :func:`read_checkpoint_state` reads Lightning checkpoints with the
  weights-only unpickler: a ``.ckpt`` file, or the folder of shards a sharded run (``trainer=fsdp``)
  writes (:func:`is_sharded_checkpoint`), of which only the encoder's tensors are read; the index of
  such a folder is a plain pickle, so it is read only when the caller trusts it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import pickle
from collections.abc import Iterable, Mapping, Sequence
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
#: Lightning module keys of the encoder, per choice of ``weights`` (the EMA teacher: DINO's ``teacher["encoder"]``,
#: VoCo's ``teacher_encoder`` under ``version="original"``); ``"auto"`` is the teacher where a checkpoint holds one, else the student: the
#: encoder the objective is evaluated by (``Objective.eval_encoder``), which a pretraining run exports itself
CHECKPOINT_PREFIXES = {"student": ("objective.encoder.",), "teacher": ("objective.teacher.encoder.", "objective.teacher_encoder.")}
WEIGHTS_CHOICES = ("auto", "student", "teacher")
#: in a sharded checkpoint folder: the index ``torch.distributed.checkpoint`` writes after every shard
SHARD_INDEX = ".metadata"
#: in a sharded checkpoint: the entry holding the Lightning module's state dict (the others are optimisers)
SHARDED_MODEL_KEY = "state_dict"


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


def is_sharded_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a sharded checkpoint: a folder of ``torch.distributed.checkpoint`` shards with
    their index, as Lightning's ``ModelParallelStrategy`` writes for ``trainer=fsdp``."""
    return path.is_dir() and (path / SHARD_INDEX).is_file()


def read_checkpoint_state(
    path: Path, *, weights: Literal["auto", "student", "teacher"] = "student", trust_pickle: bool = False
) -> dict[str, Tensor]:
    """The encoder's state dict from a Lightning pretraining checkpoint (``weights``: :data:`CHECKPOINT_PREFIXES`).

    A checkpoint file is read with ``torch.load(weights_only=True)`` (tensors and plain containers only,
    no code); ``trust_pickle=True`` allows a full unpickle for checkpoints that need it. A checkpoint
    folder must be a sharded checkpoint (:func:`is_sharded_checkpoint`), read on this one process by
    :func:`read_sharded_tensors` (no process group needed). Its tensors are read with the weights-only
    unpickler but ``torch.distributed.checkpoint`` reads its index with a full one, so a folder needs
    ``trust_pickle=True`` (:class:`UnsafeWeightsError` otherwise).
    """
    return read_encoder_weights(path, weights=weights, trust_pickle=trust_pickle)[0]


def read_encoder_weights(
    path: Path, *, weights: Literal["auto", "student", "teacher"] = "auto", trust_pickle: bool = False
) -> tuple[dict[str, Tensor], str]:
    """:func:`read_checkpoint_state` and which encoder it read (``"student"`` or ``"teacher"``, ``weights`` resolved)."""
    if weights not in WEIGHTS_CHOICES:
        raise ExportError(f"weights must be one of {list(WEIGHTS_CHOICES)}, got {weights!r}")
    path = Path(path)
    if path.is_dir():
        if not trust_pickle:
            raise refuse_sharded_pickle(path)
        keys = sharded_model_keys(path)
        chosen = resolve_weights(keys, weights)
        names = _encoder_names(keys, path, chosen)
        state = read_sharded_tensors(path, names)
    else:
        state = _checkpoint_file_state(path, trust_pickle)
        chosen = resolve_weights(state, weights)
        names = _encoder_names(state, path, chosen)
    return {name: state[key] for key, name in names.items()}, chosen


def resolve_weights(keys: Iterable[str], weights: str) -> str:
    """``"student"`` or ``"teacher"`` for a checkpoint's module ``keys``: ``weights`` itself, or for ``"auto"``
    the teacher where the checkpoint holds one (the encoder a run exports), else the student."""
    if weights != "auto":
        return weights
    teacher = CHECKPOINT_PREFIXES["teacher"]
    return "teacher" if any(key.removeprefix("module.").startswith(teacher) for key in keys) else "student"


def _checkpoint_file_state(path: Path, trust_pickle: bool) -> dict[str, Any]:
    """The module state dict of a single-file Lightning checkpoint (or a bare state dict)."""
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
    return state


def _encoder_names(keys: Iterable[str], path: Path, weights: str) -> dict[str, str]:
    """Checkpoint key -> encoder parameter name, for the keys of the ``weights`` encoder (``module.``
    removed); :class:`ExportError` naming what the checkpoint holds when there are none."""
    prefixes = CHECKPOINT_PREFIXES[weights]
    stripped = {key: key.removeprefix("module.") for key in keys}
    names = {
        key: name.removeprefix(prefix) for key, name in stripped.items() for prefix in prefixes if name.startswith(prefix)
    }
    if not names:
        roots = sorted({".".join(name.split(".")[:2]) for name in stripped.values()})
        other = "" if weights == "student" else " (only objectives with an EMA teacher keep one: DINO, VoCo version=original)"
        raise ExportError(f"{path} has no {weights} encoder weights under {' or '.join(map(repr, prefixes))}{other}; it holds {roots[:8]}")
    return names


def refuse_sharded_pickle(folder: Path) -> UnsafeWeightsError:
    """The error raised for a sharded checkpoint folder offered without ``trust_pickle=True``."""
    return UnsafeWeightsError(
        f"refusing to read the sharded checkpoint {folder} without trust_pickle=True: torch.distributed.checkpoint "
        f"unpickles its index ({SHARD_INDEX}) in full, which can run arbitrary code. Pass trust_pickle=True "
        "(ssl_med export ... trust_pickle=true) if you trust where it came from, e.g. a run of your own"
    )


def sharded_model_keys(folder: Path) -> list[str]:
    """The Lightning module's state-dict keys whose tensors the sharded checkpoint ``folder`` holds
    (read from its index, a full unpickle: trusted folders only; no shard is opened). :class:`ExportError`
    naming ``folder`` when it is not a sharded checkpoint."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    if not is_sharded_checkpoint(folder):
        raise ExportError(
            f"{folder} is a folder but not a sharded checkpoint: it has no {SHARD_INDEX} (the index "
            "torch.distributed.checkpoint writes once every shard is saved); expected a .ckpt file, a sharded "
            "checkpoint folder (trainer=fsdp), a run folder or an export folder"
        )
    try:
        metadata = FileSystemReader(folder).read_metadata()
    except (pickle.UnpicklingError, EOFError, OSError, AttributeError) as err:
        raise IntegrityError(f"{folder / SHARD_INDEX} is not a readable checkpoint index: {err!r}") from err
    keys = [
        str(fqn[1])
        for flat, fqn in (metadata.planner_data or {}).items()
        if len(fqn) == 2 and fqn[0] == SHARDED_MODEL_KEY
        and isinstance(metadata.state_dict_metadata.get(flat), TensorStorageMetadata)
    ]  # fmt: skip
    if not keys:
        raise ExportError(f"{folder} holds no {SHARDED_MODEL_KEY!r} tensors: not a Lightning pretraining checkpoint")
    return keys


def read_sharded_tensors(folder: Path, keys: Iterable[str]) -> dict[str, Tensor]:
    """The full tensors of the module state-dict ``keys`` of the sharded checkpoint ``folder``, read on
    this process alone (as ``torch.distributed.checkpoint.format_utils.dcp_to_torch_save`` and
    Lightning's consolidation do, but only these keys: not the optimiser state); the tensors are read with
    the weights-only unpickler, the index with a full one (trusted folders only). An unreadable shard is an
    :class:`IntegrityError`."""
    from torch.distributed.checkpoint import CheckpointException, FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    wanted = {f"{SHARDED_MODEL_KEY}.{key}" for key in keys}  # the index's flattened names
    loaded: dict[str, Any] = {}
    try:
        _load_state_dict(
            loaded, storage_reader=FileSystemReader(folder), planner=_EmptyStateDictLoadPlanner(keys=wanted), no_dist=True
        )
    except (CheckpointException, OSError, RuntimeError) as err:
        raise IntegrityError(f"{folder}: cannot read the sharded checkpoint: {err}") from err
    return dict(loaded.get(SHARDED_MODEL_KEY, {}))


def load_pickle_weights(path: Path) -> dict[str, Tensor]:
    """A trusted pickle file's state dict (under ``state_dict`` or ``model`` if nested, ``module.`` removed)."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    if not isinstance(state, dict):
        raise ExportError(f"{path} holds no state dict")
    return {k.removeprefix("module."): v for k, v in state.items()}
