"""The encoder interface every backbone implements, and the shared token-model skeleton.

Objectives and evaluators talk to backbones only through :class:`Encoder`::

    out = encoder(x)                                 # x: (B, C, H, W) or (B, C, D, H, W)
    out.pooled                                       # (B, D)   CLS token, or pooled tokens
    out.patch_tokens, out.grid                       # (B, N, D) final-normed, grid (h, w) / (d, h, w)
    encoder(x, mask=m)                               # m: (B, N) bool -> masked patch embeddings
                                                     #    replaced by a learned mask token (iBOT)
    encoder(x, keep_idx=idx)                         # idx: (B, N_keep) -> visible-only forward (MAE)
    encoder(x, return_layers=(3, 6, 9)).hidden_states  # raw residual stream after those blocks
    encoder(x, channel_names=[["t1", "flair"], ...]) # channel-adaptive backbones only

All planned backbones (ViT, Mamba/Vim, xLSTM/ViL, ChAda-ViT) are isotropic token models, so
:class:`TokenEncoder` implements the interface once: patch embedding -> mask-token replacement ->
position embedding -> token dropping -> prefix (CLS) tokens -> blocks -> final norm -> pooling.
A new backbone subclasses it and builds ``self.blocks``; sequence models override
:meth:`TokenEncoder.run_block` to use the :class:`TokenLayout` (grid, kept indices) for their scan
orders.
"""

from __future__ import annotations

import math
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ssl_med.layers.patch_embed import PatchEmbed, grid_shape
from ssl_med.layers.pos_embed import resample_pos_embed, sincos_pos_embed
from ssl_med.utils import to_tuple

Pooling = Literal["cls", "mean", "first_last"]


@dataclass
class EncoderOutput:
    """What an encoder returns.

    Attributes:
        pooled: ``(B, D)`` image embedding (CLS token after the final norm, or pooled tokens).
        patch_tokens: ``(B, N, D)`` final-normed patch tokens in raster order; with ``keep_idx`` only
            the kept ones, ``(B, N_keep, D)``, in the order of ``keep_idx``.
        grid: the full token grid, ``(h, w)`` or ``(d, h, w)``; ``N = prod(grid)``.
        hidden_states: raw (pre-final-norm) patch tokens after each block in ``return_layers``,
            each ``(B, N or N_keep, D)``.
        prefix_tokens: ``(B, P, D)`` final-normed prefix (CLS/register) tokens, ``None`` if none.
    """

    pooled: Tensor
    patch_tokens: Tensor
    grid: tuple[int, ...]
    hidden_states: list[Tensor] = field(default_factory=list)
    prefix_tokens: Tensor | None = None


@dataclass
class TokenLayout:
    """Where each token of the mixed sequence sits, for blocks that care about order.

    Attributes:
        grid: the full patch grid.
        keep_idx: ``(B, N_keep)`` kept patch indices (raster numbering), ``None`` if all are kept.
        prefix_positions: indices in the sequence occupied by prefix tokens.
    """

    grid: tuple[int, ...]
    keep_idx: Tensor | None
    prefix_positions: tuple[int, ...]

    @property
    def num_patches(self) -> int:
        return math.prod(self.grid)


class Encoder(nn.Module, ABC):
    """Interface shared by all backbones.

    Attributes:
        spatial_dims: 2 or 3.
        patch_size: one size per spatial axis.
        embed_dim: token width D.
        depth: number of blocks (valid ``return_layers`` are ``-depth .. depth-1``).
        in_chans: input channels, or ``None`` for channel-adaptive backbones.
        block_classes: the classes of the encoder's repeated blocks, declared by each backbone: the
            unit FSDP shards (one all-gather per block, :mod:`ssl_med.train.sharding`), as Lightning's
            ``auto_wrap_policy={Block}`` and Hugging Face's ``_no_split_modules``. Empty: no
            per-block sharding (the encoder is sharded as one unit).
    """

    block_classes: ClassVar[tuple[type[nn.Module], ...]] = ()
    spatial_dims: int
    patch_size: tuple[int, ...]
    embed_dim: int
    depth: int
    in_chans: int | None

    @abstractmethod
    def forward(
        self,
        x: Tensor,
        *,
        mask: Tensor | None = None,
        keep_idx: Tensor | None = None,
        return_layers: Sequence[int] = (),
        channel_names: Sequence[Sequence[str]] | None = None,
    ) -> EncoderOutput:
        """Encode ``x`` ``(B, C, *S)``; see the module docstring for the keyword arguments."""

    def grid_shape(self, spatial_shape: Sequence[int]) -> tuple[int, ...]:
        """Token grid for an input of ``spatial_shape`` (each axis a multiple of the patch)."""
        return grid_shape(spatial_shape, self.patch_size)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute activations in the backward pass to save memory (``trainer.activation_checkpointing``)."""
        raise NotImplementedError(f"{type(self).__name__} does not support activation checkpointing")

    def num_patches(self, spatial_shape: Sequence[int]) -> int:
        return math.prod(self.grid_shape(spatial_shape))

    # -- parameter metadata (timm's convention): what optimisers ask instead of parsing names ----
    def no_weight_decay(self) -> set[str]:
        """Parameter names (``named_parameters()`` keys of this encoder) trained without weight decay,
        besides biases and 1-D parameters, which never get it. Default: none."""
        return set()

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """timm's parameter grouping: ``{"stem": regex, "blocks": [(regex, None)], "norm": regex}``.

        ``stem`` matches the input-side parameters (layer 0); the ``blocks`` regex captures the block
        index (block ``i`` is layer ``i + 1``); ``norm`` (and anything unmatched) comes after the last
        block (layer ``depth + 1``). timm's ``param_groups_layer_decay`` reads the same dictionary and
        numbers the layers as :meth:`layer_id` does.
        """
        raise NotImplementedError(f"{type(self).__name__} does not declare group_matcher()")

    def layer_id(self, name: str) -> int:
        """Depth position of parameter ``name`` for layer-wise learning-rate decay (BEiT, DINOv2's
        ``get_vit_lr_decay_rate``): 0 for the stem, ``i + 1`` for block ``i``, ``depth + 1`` after the
        blocks (final norm). Read from :meth:`group_matcher`."""
        matcher = self.group_matcher()
        if matcher.get("stem") and re.match(matcher["stem"], name):
            return 0
        for pattern, _ in matcher.get("blocks", ()):
            found = re.match(pattern, name)
            if found:
                return int(found.group(1)) + 1
        return self.depth + 1

    def patch_embed_names(self) -> set[str]:
        """Names of the patch-embedding parameters (DINOv2 trains them at ``patch_embed_lr_mult``)."""
        return set()


def config_input_size(backbone: dict[str, Any]) -> list[int] | None:
    """The input size ``(S_1, ..., S_d)`` a backbone config was built for (``img_size`` given as one
    int is repeated over ``spatial_dims``), or ``None`` when the config does not say."""
    size = backbone.get("img_size")
    if size is None:
        return None
    if isinstance(size, int):
        return [size] * int(backbone.get("spatial_dims", 2))
    return [int(v) for v in size]


def size_preset(family: str, presets: dict[str, tuple[int, ...]], size: str, *explicit: int | None) -> tuple[int, ...]:
    """A named size's dimensions (e.g. ``(embed_dim, depth, num_heads)``), each overridden by the
    matching ``explicit`` value when that is not ``None``; unknown sizes list the valid ones."""
    if size not in presets:
        raise ValueError(f"unknown {family} size {size!r}; choose one of {sorted(presets)}")
    return tuple(d if e is None else e for d, e in zip(presets[size], explicit, strict=False))


def _pool(pooling: str, prefix: Tensor | None, patches: Tensor) -> Tensor:
    if pooling == "cls":
        if prefix is None:
            raise ValueError("pooling='cls' needs a class token (class_token=True)")
        return prefix[:, 0]
    if pooling == "mean":
        return patches.mean(dim=1)
    if pooling == "first_last":  # ViL's "bilateral" pooling: mean of the first and last token
        return 0.5 * (patches[:, 0] + patches[:, -1])
    raise ValueError(f"unknown pooling {pooling!r}; choose cls, mean or first_last")


class TokenEncoder(Encoder):
    """Skeleton of an isotropic token model; subclasses provide ``self.blocks``.

    Args:
        spatial_dims: 2 or 3.
        in_chans: input channels C.
        patch_size: int or one per axis.
        embed_dim: token width D.
        depth: number of blocks the subclass builds.
        img_size: input size the learned position embedding is created for (int or per axis);
            other sizes (multiples of the patch) are served by interpolation.
        pos_embed: ``"learned"`` (trunc-normal init) or ``"sincos"`` (fixed, not trained).
        class_token: prepend a CLS token.
        cls_position: ``"first"`` or ``"middle"`` (Vim) of the token sequence.
        num_register_tokens: extra learned prefix tokens (DINOv2 registers), after the CLS token.
        pooling: ``"cls"``, ``"mean"`` (of patch tokens) or ``"first_last"``; defaults to ``"cls"``
            with a class token, else ``"mean"``.
        pos_embed_prefix: the learned position table also has rows for the CLS token (timm layout
            ``(1, 1 + N, D)``).
        norm_layer: final normalisation constructor, called with ``embed_dim``.
    """

    def __init__(
        self,
        spatial_dims: int,
        in_chans: int,
        patch_size: int | Sequence[int],
        embed_dim: int,
        depth: int,
        img_size: int | Sequence[int],
        pos_embed: Literal["learned", "sincos"] = "learned",
        class_token: bool = True,
        cls_position: Literal["first", "middle"] = "first",
        num_register_tokens: int = 0,
        pooling: Pooling | None = None,
        pos_embed_prefix: bool = False,
        norm_layer: type[nn.Module] = nn.LayerNorm,
    ) -> None:
        super().__init__()
        self.spatial_dims = spatial_dims
        self.in_chans = in_chans
        self.patch_size = to_tuple(patch_size, spatial_dims)
        self.embed_dim = embed_dim
        self.depth = depth
        self.cls_position = cls_position
        self.pooling = pooling or ("cls" if class_token else "mean")
        if self.pooling == "cls" and not class_token:
            raise ValueError("pooling='cls' needs class_token=True")
        if pos_embed not in ("learned", "sincos"):
            raise ValueError(f"pos_embed must be 'learned' or 'sincos', got {pos_embed!r}")

        self.patch_embed = self.build_patch_embed(in_chans)
        self.base_grid = grid_shape(to_tuple(img_size, spatial_dims), self.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if class_token else None
        self.reg_token = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        )
        self.num_prefix_tokens = int(class_token) + num_register_tokens
        n_pos_prefix = int(class_token) if pos_embed_prefix else 0
        self.num_pos_prefix = n_pos_prefix
        n = math.prod(self.base_grid)
        if pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, n_pos_prefix + n, embed_dim))
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        else:
            table = sincos_pos_embed(self.base_grid, embed_dim)[None]
            table = torch.cat([table.new_zeros(1, n_pos_prefix, embed_dim), table], dim=1)
            self.pos_embed = nn.Parameter(table, requires_grad=False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.norm = norm_layer(embed_dim)
        self.grad_checkpointing = False
        if self.cls_token is not None:
            nn.init.normal_(self.cls_token, std=1e-6)
        if self.reg_token is not None:
            nn.init.normal_(self.reg_token, std=1e-6)

    # -- pieces a subclass may override -------------------------------------------------------
    def build_patch_embed(self, in_chans: int) -> nn.Module:
        return PatchEmbed(self.spatial_dims, self.patch_size, in_chans, self.embed_dim)

    def embed_patches(self, x: Tensor, channel_names: Sequence[Sequence[str]] | None) -> tuple[Tensor, tuple]:
        """``(B, C, *S)`` -> patch embeddings ``(B, N, D)`` without positions, and the grid."""
        if channel_names is not None:
            raise ValueError(f"{type(self).__name__} is not channel-adaptive; drop channel_names")
        return self.patch_embed(x)

    def patch_position_embedding(self, grid: tuple[int, ...]) -> Tensor:
        """``(1, N, D)`` position embedding of the patch tokens for ``grid``."""
        table = self.pos_embed[:, self.num_pos_prefix :]
        if grid == self.base_grid:
            return table
        if not self.pos_embed.requires_grad:  # fixed sin-cos: recompute exactly
            return sincos_pos_embed(grid, self.embed_dim)[None].to(table)
        return resample_pos_embed(table, self.base_grid, grid)

    def run_block(self, index: int, x: Tensor, layout: TokenLayout) -> Tensor:
        """Apply block ``index`` to the sequence ``(B, L, D)``; sequence models use ``layout``."""
        return self.blocks[index](x)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing (timm's name): keep only each block's input and recompute the block
        in the backward pass; less memory for about one more forward. Outputs and gradients are unchanged."""
        self.grad_checkpointing = enable

    def call_block(self, block: Callable[..., Tensor], *args: Any, **kwargs: Any) -> Tensor:
        """``block(*args, **kwargs)``, recomputed in the backward when grad checkpointing is on."""
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False, **kwargs)
        return block(*args, **kwargs)

    # -- the interface ------------------------------------------------------------------------
    def prefix_tokens(self, batch: int) -> Tensor | None:
        """``(B, P, D)`` CLS (+ its position) and register tokens, or ``None``."""
        parts = []
        if self.cls_token is not None:
            cls = self.cls_token
            if self.num_pos_prefix:
                cls = cls + self.pos_embed[:, :1]
            parts.append(cls)
        if self.reg_token is not None:
            parts.append(self.reg_token)
        if not parts:
            return None
        return torch.cat(parts, dim=1).expand(batch, -1, -1)

    def forward(
        self,
        x: Tensor,
        *,
        mask: Tensor | None = None,
        keep_idx: Tensor | None = None,
        return_layers: Sequence[int] = (),
        channel_names: Sequence[Sequence[str]] | None = None,
    ) -> EncoderOutput:
        tokens, grid = self.embed_patches(x, channel_names)
        b, n, _ = tokens.shape
        if mask is not None:
            if mask.shape != (b, n):
                raise ValueError(f"mask must be (B, N) = {(b, n)}, got {tuple(mask.shape)}")
            tokens = torch.where(mask.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)
        tokens = tokens + self.patch_position_embedding(grid)
        if keep_idx is not None:
            if keep_idx.ndim != 2 or keep_idx.shape[0] != b:
                raise ValueError(f"keep_idx must be (B, N_keep) with B={b}, got {tuple(keep_idx.shape)}")
            tokens = torch.gather(tokens, 1, keep_idx.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        seq, prefix_positions = self._insert_prefix(tokens)
        layout = TokenLayout(grid=grid, keep_idx=keep_idx, prefix_positions=prefix_positions)

        wanted = self._normalise_layers(return_layers)
        hidden: dict[int, Tensor] = {}
        for i in range(self.depth):
            seq = self.call_block(self.run_block, i, seq, layout)
            if i in wanted:
                hidden[i] = self._split_prefix(seq, prefix_positions)[1]
        seq = self.norm(seq)
        prefix, patches = self._split_prefix(seq, prefix_positions)
        return EncoderOutput(
            pooled=_pool(self.pooling, prefix, patches),
            patch_tokens=patches,
            grid=grid,
            hidden_states=[hidden[i] for i in wanted],
            prefix_tokens=prefix,
        )

    # -- helpers ------------------------------------------------------------------------------
    def _normalise_layers(self, layers: Sequence[int]) -> list[int]:
        out = []
        for layer in layers:
            if not -self.depth <= layer < self.depth:
                raise ValueError(f"return_layers index {layer} out of range for depth {self.depth}")
            out.append(layer % self.depth)
        return out

    def _insert_prefix(self, tokens: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        prefix = self.prefix_tokens(tokens.shape[0])
        if prefix is None:
            return tokens, ()
        prefix = prefix.to(tokens.dtype)
        at = tokens.shape[1] // 2 if self.cls_position == "middle" else 0
        seq = torch.cat([tokens[:, :at], prefix, tokens[:, at:]], dim=1)
        return seq, tuple(range(at, at + prefix.shape[1]))

    @staticmethod
    def _split_prefix(seq: Tensor, positions: tuple[int, ...]) -> tuple[Tensor | None, Tensor]:
        if not positions:
            return None, seq
        start, stop = positions[0], positions[-1] + 1
        return seq[:, start:stop], torch.cat([seq[:, :start], seq[:, stop:]], dim=1)

    def no_weight_decay(self) -> set[str]:
        """Position, CLS, register and mask tokens (timm's convention)."""
        return {"pos_embed", "cls_token", "reg_token", "mask_token"}

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Stem: every parameter outside ``blocks`` and the final ``norm`` (patch embedding, positions,
        prefix/mask tokens, and whatever input-side embeddings a subclass adds, e.g. ChAda-ViT's
        channel embeddings); then ``blocks.i``; then the final norm. A backbone with parameters after
        the blocks besides ``norm`` overrides this. (timm's own ViT puts ``norm`` in the last block's
        group; here it is a layer of its own, as in BEiT and DINOv2.)"""
        return {"stem": r"^(?!blocks\.|norm\.)", "blocks": [(r"^blocks\.(\d+)\.", None)], "norm": r"^norm\."}

    def patch_embed_names(self) -> set[str]:
        return {f"patch_embed.{name}" for name, _ in self.patch_embed.named_parameters()}
