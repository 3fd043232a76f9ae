"""Model-hub and timm interoperability for exported encoders.

* **Hugging Face Hub**: :func:`download` fetches an export folder (``config.json`` +
  ``model.safetensors`` + ``README.md``) through ``huggingface_hub.snapshot_download``;
  :func:`push_to_hub` uploads one. Both fail fast with a :class:`HubError` that says what to do
  when there is no network or no token.
* **timm registry**: every ssl_med backbone is a timm model ``ssl_med_<name>`` (``ssl_med_vit``,
  ``ssl_med_mamba``, ...) built by :func:`create_timm_model`: the encoder behind timm's API
  (:class:`~ssl_med.feature_model.FeatureModel`). The installed package registers these names when
  timm is imported (:mod:`ssl_med.timm_plugin`); importing this module registers them too. So::

      model = timm.create_model("local-dir:/path/to/export", pretrained=True)   # or "hf-hub:ORG/NAME"

  2D ViT exports name a timm-native ``architecture`` instead (``vit_small_patch16_224`` + ``model_args``),
  so they load into timm's own ``VisionTransformer`` without ssl_med installed.
* **timm ViT weights**: :func:`ssl_med_to_timm_vit` maps ssl_med ViT weights to timm's keys;
  :func:`load_timm_vit_weights` initialises ssl_med's ViT from a local timm, DINOv2 or Hugging Face
  Dinov2 checkpoint with the pickle policy of :func:`ssl_med.load_pretrained` (reading and conversion
  by ``backbones.vit.load_pretrained_weights``, the same as ``backbone.init_from``).
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor

from ssl_med.encoder import Encoder
from ssl_med.feature_model import FeatureModel
from ssl_med.registry import BACKBONES
from ssl_med.timm_entrypoints import TIMM_PREFIX, register_timm_entrypoints
from ssl_med.weights import (  # noqa: F401  (state_dict_mismatch re-exported)
    CONFIG_NAME,
    PICKLE_SUFFIXES,
    WEIGHTS_NAME,
    UnsafeWeightsError,
    state_dict_mismatch,
)

HF_PREFIX = "hf-hub:"
#: files an export folder may hold; downloads fetch only these (never pickles unless trusted)
EXPORT_FILES = (CONFIG_NAME, WEIGHTS_NAME, "README.md", "eval_results.json", "training_config.yaml")
#: one part (ORG or NAME) of a hub repository id
REPO_PART = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9])?")


class HubError(RuntimeError):
    """A model-hub operation that could not run (offline, no token, unknown repository, network error)."""


# --------------------------------------------------------------------------------------------------
# Hugging Face Hub
# --------------------------------------------------------------------------------------------------
def _offline() -> bool:
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "")
    return bool(constants.HF_HUB_OFFLINE) or flag.upper() in ("1", "ON", "YES", "TRUE")


def check_repo_id(repo_id: str) -> str:
    """``repo_id`` if it is a hub repository id ``ORG/NAME``, else a ``ValueError`` saying why.

    Each part is 1-96 letters, digits, ``-``, ``_`` or ``.``, starts and ends with a letter or digit and
    holds no ``--`` or ``..`` (the hub's own rules), so that no path (``../x``, ``/abs``, ``org/``)
    reaches an upload or a model card title.
    """
    parts = repo_id.split("/")
    problem = None
    if len(parts) != 2 or not all(parts):
        problem = "it must be ORG/NAME: two non-empty parts separated by one '/'"
    elif not all(REPO_PART.fullmatch(part) for part in parts):
        problem = "each part must be 1-96 letters, digits, '-', '_' or '.', starting and ending with a letter or digit"
    elif any(".." in part or "--" in part for part in parts) or repo_id.endswith(".git"):
        problem = "'..', '--' and a '.git' ending are not allowed"
    if problem:
        raise ValueError(f"{repo_id!r} is not a hub repository id: {problem}")
    return repo_id


def split_repo_id(ref: str) -> tuple[str, str | None]:
    """``"hf-hub:ORG/NAME@rev"`` (or ``"ORG/NAME"``) -> ``("ORG/NAME", "rev" or None)``."""
    repo, _, revision = ref.removeprefix(HF_PREFIX).partition("@")
    return check_repo_id(repo), revision or None


def download(
    ref: str,
    *,
    revision: str | None = None,
    cache_dir: str | Path | None = None,
    trust_pickle: bool = False,
) -> Path:
    """Fetch the export files of hub repository ``ref`` (``hf-hub:ORG/NAME[@rev]``) and return the local folder.

    Uses the local cache when ``HF_HUB_OFFLINE=1``. Pickle weight files (``pytorch_model.bin``) are
    fetched only with ``trust_pickle=True``.
    """
    from huggingface_hub import snapshot_download

    repo_id, ref_revision = split_repo_id(ref)
    patterns = list(EXPORT_FILES) + ([f"*{s}" for s in PICKLE_SUFFIXES] if trust_pickle else [])
    try:
        folder = snapshot_download(
            repo_id,
            revision=revision or ref_revision,
            cache_dir=None if cache_dir is None else str(cache_dir),
            allow_patterns=patterns,
        )
    except Exception as err:  # LocalEntryNotFoundError, RepositoryNotFoundError, connection errors
        hint = (
            "HF_HUB_OFFLINE is set and the repository is not in the local cache"
            if _offline()
            else "check the repository id, your network and (for private repositories) your token"
        )
        raise HubError(f"could not download {repo_id!r} from the hub: {type(err).__name__}: {err} ({hint})") from err
    return Path(folder)


def push_to_hub(
    folder: str | Path,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool = False,
    commit_message: str = "Upload ssl_med encoder",
    endpoint: str | None = None,
) -> str:
    """Upload an export folder to hub repository ``repo_id`` (``ORG/NAME``), creating it if needed.

    The token comes from ``token``, ``HF_TOKEN`` or ``hf auth login``. Returns the commit URL.

    Raises:
        HubError: offline (``HF_HUB_OFFLINE``), no token, or the hub could not be reached.
    """
    from huggingface_hub import HfApi, get_token

    repo_id, _ = split_repo_id(repo_id)
    folder = Path(folder)
    retry = f"the export in {folder} is complete; upload it later with `hf upload {repo_id} {folder}`"
    if _offline():
        raise HubError(f"cannot push to {repo_id!r}: HF_HUB_OFFLINE is set; {retry}")
    token = token or get_token()
    if not token:
        raise HubError(
            f"cannot push to {repo_id!r}: no Hugging Face token (set HF_TOKEN or run `hf auth login`); {retry}"
        )
    api = HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT") or None, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            commit_message=commit_message,
            allow_patterns=list(EXPORT_FILES),
        )
    except Exception as err:  # HfHubHTTPError, connection errors, timeouts
        raise HubError(f"could not push to {repo_id!r}: {type(err).__name__}: {err}; {retry}") from err
    return str(getattr(info, "commit_url", info))


# --------------------------------------------------------------------------------------------------
# timm: config fields and registry entry points
# --------------------------------------------------------------------------------------------------
def _timm_native_vit(backbone: Mapping[str, Any], encoder: Encoder) -> tuple[str, dict[str, Any]] | None:
    """timm ``VisionTransformer`` name + ``model_args`` building the same network, or ``None`` if none does.

    ssl_med's ViT uses timm's parameter layout; it matches timm when it is 2D, has a fixed channel count,
    fuses the channels in one patch embedding (not ``channel_tokens=per_modality``: one kernel and token
    per sequence) and has no register tokens (ssl_med gives registers no position rows, timm either gives
    them rows or moves the CLS row out).
    """
    import timm

    if backbone.get("name") != "vit" or encoder.spatial_dims != 2 or encoder.in_chans is None:
        return None
    if getattr(encoder, "tokens_per_channel", False):
        return None
    if getattr(encoder, "reg_token", None) is not None:
        return None
    cls = getattr(encoder, "cls_token", None) is not None
    ph, pw = encoder.patch_size
    grid = encoder.base_grid  # type: ignore[attr-defined]
    img_size = [grid[0] * ph, grid[1] * pw]
    block = encoder.blocks[0]  # type: ignore[index]
    model_args: dict[str, Any] = {
        "img_size": img_size,
        "patch_size": [ph, pw],
        "in_chans": encoder.in_chans,
        "num_classes": 0,
        "embed_dim": encoder.embed_dim,
        "depth": encoder.depth,
        "num_heads": encoder.num_heads,  # type: ignore[attr-defined]
        "mlp_ratio": block.mlp.fc1.out_features / encoder.embed_dim,
        "qkv_bias": block.attn.qkv.bias is not None,
        # LayerScale on/off is what matters for the layout; the trained gammas come with the weights
        "init_values": backbone.get("init_values") if hasattr(block.ls1, "gamma") else None,
        "class_token": cls,
        "global_pool": "token" if cls else "avg",
        "fc_norm": False,  # the final norm is applied to all tokens, as ssl_med does
        "no_embed_class": False,
        "reg_tokens": 0,
    }
    size = {192: "tiny", 384: "small", 768: "base", 1024: "large"}.get(encoder.embed_dim, "base")
    candidates = [f"vit_{size}_patch{ph}_{img_size[0]}", f"vit_{size}_patch16_224", "vit_base_patch16_224"]
    arch = next(name for name in candidates if timm.is_model(name))
    return arch, model_args


def timm_fields(backbone: Mapping[str, Any], encoder: Encoder) -> dict[str, Any]:
    """The timm hub-format fields of ``config.json``: ``architecture``, ``model_args``, ``num_classes``,
    ``num_features`` and ``pretrained_cfg`` (input size, mean/std for inputs already scaled to [0, 1])."""
    channels = encoder.in_chans or 1
    grid = getattr(encoder, "base_grid", None)
    spatial = [g * p for g, p in zip(grid, encoder.patch_size)] if grid else None
    native = _timm_native_vit(backbone, encoder)
    if native is not None:
        architecture, model_args = native
    else:
        architecture = TIMM_PREFIX + str(backbone["name"])
        model_args = {k: v for k, v in backbone.items() if k != "name"}
    pretrained_cfg = {
        "architecture": architecture,
        "input_size": [channels, *spatial] if spatial else None,
        "fixed_input_size": False,
        "interpolation": "bicubic" if encoder.spatial_dims == 2 else "trilinear",
        "crop_pct": 1.0,
        "mean": [0.0] * channels,  # crops are already scaled to [0, 1] per image: no further normalisation
        "std": [1.0] * channels,
        "num_classes": 0,
        "first_conv": "patch_embed.proj" if native is not None else None,
        "classifier": None,
        # what timm users see in the config when the architecture is unknown to their timm
        "notes": None if native is not None else [
            f"{architecture} is registered with timm by the ssl_med package: `pip install ssl_med` "
            "(timm then reports no 'Unknown model'); `import ssl_med.hub` registers it by hand"
        ],
    }
    return {
        "architecture": architecture,
        "model_args": model_args,
        "num_classes": 0,
        "num_features": encoder.embed_dim,
        "global_pool": model_args.get("global_pool", getattr(encoder, "pooling", None)),
        "pretrained_cfg": {k: v for k, v in pretrained_cfg.items() if v is not None},
    }


def _cfg_dict(cfg: Any) -> dict[str, Any]:
    if cfg is None or isinstance(cfg, str):
        return {}
    if hasattr(cfg, "to_dict"):
        return dict(cfg.to_dict())
    return dict(cfg)


def create_timm_model(
    backbone: str,
    pretrained: bool = False,
    pretrained_cfg: Any = None,
    pretrained_cfg_overlay: Mapping[str, Any] | None = None,
    cache_dir: str | Path | None = None,
    num_classes: int = 0,
    global_pool: str | None = None,
    drop_rate: float = 0.0,
    pretrained_model_args: Any = None,
    **kwargs: Any,
) -> FeatureModel:
    """What ``timm.create_model("ssl_med_<backbone>", ...)`` calls: the encoder behind timm's API.

    ``kwargs`` are the backbone's constructor arguments (an export's ``model_args``). With
    ``pretrained=True`` the weights come from ``pretrained_cfg["file"]`` (``local-dir:``, or
    ``pretrained_cfg_overlay=dict(file=...)``) or ``hf_hub_id`` (``hf-hub:``), with the sha256 and
    shape checks of :func:`ssl_med.load_pretrained`. ``num_classes > 0`` adds a new linear head.
    """
    device, dtype = kwargs.pop("device", None), kwargs.pop("dtype", None)
    cfg = {**_cfg_dict(pretrained_cfg), **dict(pretrained_cfg_overlay or {})}
    source: str | Path | None = None
    if pretrained:
        if cfg.get("file"):
            source = Path(cfg["file"])
        elif cfg.get("hf_hub_id"):
            source = download(HF_PREFIX + str(cfg["hf_hub_id"]), cache_dir=cache_dir)
        else:
            raise RuntimeError(
                f"{TIMM_PREFIX}{backbone} has no default weights: use timm.create_model('local-dir:DIR' or "
                "'hf-hub:ORG/NAME', pretrained=True) on an ssl_med export, or pretrained_cfg_overlay=dict(file=...)"
            )
    model = FeatureModel(
        {"name": backbone, **kwargs},  # given weights replace init_from
        weights=source,
        num_classes=num_classes or 0,
        global_pool=global_pool,
        drop_rate=drop_rate,
    )
    model.pretrained_cfg = cfg  # what timm.data.resolve_data_config reads
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    return model.eval() if pretrained else model


def register_timm_models() -> list[str]:
    """Register every ssl_med backbone with timm as ``ssl_med_<name>`` (idempotent); returns the timm names.

    Names already registered (by :mod:`ssl_med.timm_plugin` when timm was imported) are kept: they
    call :func:`create_timm_model` too.
    """
    register_timm_entrypoints(BACKBONES.names(), create_timm_model, sys.modules[__name__])
    return [TIMM_PREFIX + backbone for backbone in BACKBONES.names()]


# --------------------------------------------------------------------------------------------------
# ViT weights between ssl_med and timm
# --------------------------------------------------------------------------------------------------
def ssl_med_to_timm_vit(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """ssl_med ViT state dict -> timm ``VisionTransformer`` keys (drops the masked-modelling ``mask_token``).

    Usable as a ``checkpoint_filter_fn``: ``timm.create_model(name, pretrained=True, pretrained_cfg_overlay=
    dict(file=...))`` already does the same through timm's own filter, so this is for manual loading.
    """
    return {k: v for k, v in state_dict.items() if k != "mask_token"}


def load_timm_vit_weights(encoder: Encoder, path: str | Path, *, trust_pickle: bool = False) -> Encoder:
    """Initialise an ssl_med ViT ``encoder`` in place from a local ViT checkpoint; returns it.

    ``path`` is a ``.safetensors`` file or a folder holding ``model.safetensors``; pickle files
    (``.pth``/``.bin``) need ``trust_pickle=True`` (and are then read weights-only). Reading, key layouts
    (timm, ssl_med, official DINOv2, Hugging Face Dinov2) and shape conversion are the ViT's own
    :func:`backbones.vit.load_pretrained_weights`. ssl_med's ``mask_token``/``reg_token`` may be absent
    from the file and keep their initialisation; any other missing, unexpected or mis-shaped parameter
    is an error.
    """
    from backbones.vit import load_pretrained_weights

    path = Path(path)
    file = path / "model.safetensors" if path.is_dir() else path
    if file.suffix in PICKLE_SUFFIXES and not trust_pickle:
        raise UnsafeWeightsError(
            f"refusing to unpickle {file}: pickle files can run arbitrary code when loaded. Convert it to "
            ".safetensors, or pass trust_pickle=True if you trust its source"
        )
    try:
        load_pretrained_weights(encoder, path)  # type: ignore[arg-type]
    except ValueError as err:
        raise ValueError(f"{path} does not fit this ViT (embed_dim={encoder.embed_dim}, depth={encoder.depth}): {err}") from err
    return encoder


register_timm_models()
