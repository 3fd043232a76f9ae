"""An ssl_med encoder behind timm's classification-model API, for tools that expect a plain ``nn.Module``.

ssl_med encoders return an :class:`~ssl_med.encoder.EncoderOutput` (pooled embedding, patch tokens,
grid, hidden states). timm and MONAI code expects a module whose ``forward`` returns one tensor, and
timm code also calls ``forward_features``, ``forward_head``, ``num_features`` and ``reset_classifier``.
:class:`FeatureModel` provides exactly that around an unchanged encoder:

=====================================  =============================================================
``forward_features(x)``                ``(B, P + N, D)`` final-normed tokens, prefix (CLS/register)
                                       tokens first, as timm's ``VisionTransformer.forward_features``
``forward_head(x, pre_logits=False)``  pooled ``(B, D)`` (the encoder's own pooling), then the head
``forward(x)``                         ``forward_head(forward_features(x))``: with ``num_classes=0``
                                       the pooled embedding, equal to ``encoder(x).pooled``
``num_features`` / ``num_classes``     ``D`` / the head's outputs (``0``: no head)
``reset_classifier(n, global_pool)``   a fresh ``nn.Linear(D, n)`` head (``n=0``: none)
=====================================  =============================================================

``timm.create_model`` on an ssl_med export and the MONAI bundle's ``network_def`` both build this
class; :func:`ssl_med.load_pretrained` keeps returning the bare encoder. Parameters live under
``encoder.`` (the wrapped module) and ``head.``, as in timm's own wrappers of foreign models.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ssl_med.build import build_encoder
from ssl_med.encoder import Encoder

#: timm's ``global_pool`` names -> ssl_med's ``pooling`` names ("" keeps all tokens, as timm's ViT)
POOL_ALIASES = {"token": "cls", "avg": "mean", "cls": "cls", "mean": "mean", "first_last": "first_last", "": ""}


def _pool_name(name: str) -> str:
    if name not in POOL_ALIASES:
        raise ValueError(f"unknown global_pool {name!r}; choose one of {sorted(k for k in POOL_ALIASES if k)} or ''")
    return POOL_ALIASES[name]


class FeatureModel(nn.Module):
    """An ssl_med encoder with timm's model API; ``forward`` returns pooled features or logits.

    Args:
        backbone: a built :class:`~ssl_med.encoder.Encoder`, or its config ``{"name": ..., **kwargs}``
            (the ``backbone`` of an export's ``config.json``), built with :func:`~ssl_med.build.build_encoder`.
        weights: with a config, an export folder, ``.safetensors`` file or state dict to load (checked).
        num_classes: outputs of a new linear head; ``0`` (default) returns the pooled embedding.
        global_pool: ``cls``/``token``, ``mean``/``avg``, ``first_last`` or ``""`` (no pooling);
            default the encoder's own ``pooling``.
        drop_rate: dropout before the head.
    """

    def __init__(
        self,
        backbone: Encoder | Mapping[str, Any],
        *,
        weights: str | Path | Mapping[str, Tensor] | None = None,
        num_classes: int = 0,
        global_pool: str | None = None,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if isinstance(backbone, Encoder):
            if weights is not None:
                raise ValueError("weights= is for a backbone config; load them into the encoder before wrapping it")
            self.encoder = backbone
        else:
            self.encoder = build_encoder(backbone, weights=weights)
        self.num_features = self.head_hidden_size = self.embed_dim = self.encoder.embed_dim
        self.num_prefix_tokens = int(getattr(self.encoder, "num_prefix_tokens", 0))
        self.global_pool = _pool_name(global_pool if global_pool is not None else getattr(self.encoder, "pooling", "mean"))
        self.head_drop = nn.Dropout(drop_rate)
        self.num_classes = 0
        self.head: nn.Module = nn.Identity()
        self.reset_classifier(num_classes)
        self.pretrained_cfg: dict[str, Any] = {}  # filled by timm's entry point; read by timm.data.resolve_data_config

    # -- timm's model API ---------------------------------------------------------------------------
    def forward_features(self, x: Tensor, **kwargs: Any) -> Tensor:
        """``(B, P + N, D)`` tokens after the final norm, prefix tokens first (kwargs go to the encoder,
        e.g. ``channel_names`` for ChAda-ViT)."""
        out = self.encoder(x, **kwargs)
        if out.prefix_tokens is None:
            return out.patch_tokens
        return torch.cat([out.prefix_tokens, out.patch_tokens], dim=1)

    def pool(self, x: Tensor) -> Tensor:
        """Pool ``forward_features`` tokens as the encoder pools them (``global_pool=''``: unchanged)."""
        prefix, patches = x[:, : self.num_prefix_tokens], x[:, self.num_prefix_tokens :]
        if self.global_pool == "cls":
            if not self.num_prefix_tokens:
                raise ValueError("global_pool='cls' needs a class token; use 'mean'")
            return prefix[:, 0]
        if self.global_pool == "mean":
            return patches.mean(dim=1)
        if self.global_pool == "first_last":
            return 0.5 * (patches[:, 0] + patches[:, -1])
        return x

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        """Pooled features (``pre_logits=True``) or the head's output."""
        x = self.head_drop(self.pool(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor, **kwargs: Any) -> Tensor:
        return self.forward_head(self.forward_features(x, **kwargs))

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new linear head with ``num_classes`` outputs (``0``: none); optionally another pooling."""
        if global_pool is not None:
            self.global_pool = _pool_name(global_pool)
        self.num_classes = int(num_classes)
        self.head = nn.Linear(self.num_features, self.num_classes) if self.num_classes > 0 else nn.Identity()

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.encoder.set_grad_checkpointing(enable)

    def no_weight_decay(self) -> set[str]:
        return {f"encoder.{name}" for name in self.encoder.no_weight_decay()}
