"""ViT checkpoint layouts: official DINOv2 and transformers ``Dinov2Model`` weights renamed to timm's
``VisionTransformer`` keys, and the detection of which layout a state dict is in.

:func:`to_timm_layout` is what :func:`backbones.vit.read_state_dict` applies to every file it reads;
the shape conversions (channels, 2D -> 3D, grid, patch size) follow in
:func:`backbones.vit.checkpoint_filter_fn`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
from torch import Tensor

log = logging.getLogger(__name__)

#: ``blocks.{chunk}.{i}.`` of DINOv2's ``block_chunks > 0`` (the index inside a chunk is the global one).
_CHUNKED_BLOCK = re.compile(r"^blocks\.\d+\.(\d+)\.")
#: ``encoder.layer.{i}.{module}.{param}`` of transformers' ``Dinov2Model``.
_HF_LAYER = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.([^.]+)$")
#: transformers ``Dinov2Model`` parameter/module paths -> timm ones, outside the blocks.
_HF_EMBEDDINGS = {
    "embeddings.cls_token": "cls_token",
    "embeddings.mask_token": "mask_token",
    "embeddings.register_tokens": "reg_token",
    "embeddings.position_embeddings": "pos_embed",
    "embeddings.patch_embeddings.projection": "patch_embed.proj",
    "layernorm": "norm",
}
#: transformers ``Dinov2Layer`` module paths -> timm ``Block`` module paths (q/k/v are handled apart).
_HF_BLOCK_MODULES = {
    "norm1": "norm1",
    "attention.output.dense": "attn.proj",
    "layer_scale1": "ls1",
    "norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "layer_scale2": "ls2",
}


def dinov2_to_timm(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Official DINOv2 (facebookresearch/dinov2 ``DinoVisionTransformer``) keys -> timm ViT keys.

    The block names already agree with timm (``blocks.i.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,
    mlp.fc1,mlp.fc2,ls2.gamma}``, ``pos_embed`` ``(1, 1 + N, D)`` with the CLS row and none for the
    registers, as ssl_med's). Converted: chunked blocks ``blocks.{chunk}.{i}.*`` -> ``blocks.{i}.*``,
    ``register_tokens`` ``(1, R, D)`` -> ``reg_token``, ``mask_token`` ``(1, D)`` -> ``(1, 1, D)``.

    Raises:
        ValueError: for the SwiGLU MLP (``mlp.w12``/``mlp.w3``, ViT-g), which the ssl_med ViT lacks.
    """
    if any(".mlp.w12." in k or ".mlp.w3." in k for k in state):
        raise ValueError("DINOv2 checkpoint with a SwiGLU MLP (mlp.w12/mlp.w3, ViT-g) is not supported")
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key == "register_tokens":
            key = "reg_token"
        elif key == "mask_token":
            value = value.reshape(1, 1, value.shape[-1])
        out[_CHUNKED_BLOCK.sub(r"blocks.\1.", key)] = value
    return out


def hf_dinov2_to_timm(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """transformers ``Dinov2Model`` / ``Dinov2WithRegistersModel`` keys (RAD-DINO) -> timm ViT keys.

    ``embeddings.{cls_token (1, 1, D), position_embeddings (1, 1 + N, D), register_tokens (1, R, D),
    patch_embeddings.projection}`` -> ``cls_token``, ``pos_embed``, ``reg_token``, ``patch_embed.proj``;
    ``embeddings.mask_token`` ``(1, D)`` -> ``mask_token`` ``(1, 1, D)``; ``layernorm`` -> ``norm``;
    ``encoder.layer.{i}.*`` -> ``blocks.{i}.*`` with ``attention.attention.{query,key,value}``
    (``(D, D)`` and ``(D,)`` each) concatenated into ``attn.qkv`` (``(3D, D)``, ``(3D,)``),
    ``attention.output.dense`` -> ``attn.proj`` and ``layer_scale{1,2}.lambda1`` -> ``ls{1,2}.gamma``.
    Keys it does not know are kept as they are (``load_state_dict`` then reports them).

    Raises:
        ValueError: for the SwiGLU MLP (``mlp.weights_in``, ViT-g), or a layer lacking one of q/k/v.
    """
    if any(".mlp.weights_in." in k for k in state):
        raise ValueError("Dinov2Model with a SwiGLU MLP (use_swiglu_ffn, ViT-g) is not supported")
    out: dict[str, Tensor] = {}
    qkv: dict[str, dict[str, Tensor]] = {}  # "blocks.i.attn.qkv.weight" -> {"query": ..., "key": ...}
    for key, value in state.items():
        layer = _HF_LAYER.match(key)
        if layer is None:
            old = next((o for o in _HF_EMBEDDINGS if key == o or key.startswith(o + ".")), None)
            if old is not None:
                key = _HF_EMBEDDINGS[old] + key[len(old) :]
                if key == "mask_token":
                    value = value.reshape(1, 1, value.shape[-1])
            out[key] = value
            continue
        index, module, param = layer.groups()
        if module.startswith("attention.attention."):
            qkv.setdefault(f"blocks.{index}.attn.qkv.{param}", {})[module.rsplit(".", 1)[1]] = value
        elif module in _HF_BLOCK_MODULES:
            param = "gamma" if param == "lambda1" else param
            out[f"blocks.{index}.{_HF_BLOCK_MODULES[module]}.{param}"] = value
        else:
            out[key] = value
    for key, parts in qkv.items():
        if set(parts) != {"query", "key", "value"}:
            raise ValueError(f"Dinov2Model checkpoint: {key} needs query, key and value, got {sorted(parts)}")
        out[key] = torch.cat([parts["query"], parts["key"], parts["value"]], dim=0)
    return out


def _is_dinov2(state: Mapping[str, Tensor]) -> bool:
    """Keys/shapes only official DINOv2 has: registers, a 2-D mask token, chunked blocks, SwiGLU."""
    mask = state.get("mask_token")
    return (
        "register_tokens" in state
        or (mask is not None and mask.ndim == 2)
        or any(_CHUNKED_BLOCK.match(k) or ".mlp.w12." in k for k in state)
    )


class CheckpointLayout(NamedTuple):
    """A ViT state-dict layout that :func:`to_timm_layout` recognises and converts to timm names."""

    #: the patch kernel's key; whatever precedes it in a file is a module prefix (``module.``, ...).
    anchor: str
    #: whether prefix-stripped weights holding ``anchor`` are of this layout.
    detect: Callable[[Mapping[str, Tensor]], bool]
    #: prefix-stripped weights -> timm ``VisionTransformer`` names.
    to_timm: Callable[[Mapping[str, Tensor]], dict[str, Tensor]]


#: known layouts, tried in order (the first whose anchor is present and that ``detect``s wins).
CHECKPOINT_LAYOUTS: dict[str, CheckpointLayout] = {
    "hf_dinov2": CheckpointLayout(
        "embeddings.patch_embeddings.projection.weight", lambda s: True, hf_dinov2_to_timm
    ),
    "dinov2": CheckpointLayout("patch_embed.proj.weight", _is_dinov2, dinov2_to_timm),
    "timm": CheckpointLayout("patch_embed.proj.weight", lambda s: True, dict),  # timm and ssl_med
}


def to_timm_layout(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Strip the module prefix of ViT weights and rename them to timm's names (:data:`CHECKPOINT_LAYOUTS`).

    The prefix in front of the encoder weights (``module.``, ``encoder.``, ``objective.encoder.``,
    ``student.backbone.``, ``dinov2.``, ... as in Lightning, DINOv2 or transformers checkpoints) is
    the part of the key before the layout's patch-kernel anchor. When a checkpoint holds several copies,
    the teacher/EMA copy is taken: it is the encoder DINO and DINOv2 evaluate and release, and the one an
    ssl_med run exports (``weights=auto``), so ``init_from`` a checkpoint continues from the same encoder
    as ``init_from`` its export. Other keys are dropped.

    Raises:
        ValueError: no known patch-kernel key, or a layout variant that cannot be converted.
    """
    for name, layout in CHECKPOINT_LAYOUTS.items():
        anchors = [k for k in state if k == layout.anchor or k.endswith("." + layout.anchor)]
        if not anchors:
            continue
        anchor = min(anchors, key=lambda k: ("teacher" not in k and "ema" not in k, len(k)))
        prefix = anchor[: -len(layout.anchor)]
        stripped = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
        if layout.detect(stripped):
            log.debug("ViT weights in %s layout (prefix %r)", name, prefix)
            return layout.to_timm(stripped)
    anchors = sorted({layout.anchor for layout in CHECKPOINT_LAYOUTS.values()})
    raise ValueError(f"no key ending in {anchors}: not a ViT-style checkpoint")
