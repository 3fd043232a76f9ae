"""Vision Transformer for 2D and 3D inputs (``backbone=vit``), timm-compatible.

Pre-norm transformer blocks (:class:`ssl_med.layers.transformer.Block`: timm's ``Mlp``, ``DropPath``,
``LayerScale`` around ssl_med's run-time attention kernel dispatch). Parameter names follow timm's
``VisionTransformer`` (``patch_embed.proj``, ``cls_token``, ``reg_token``, ``pos_embed`` with the CLS
row, ``blocks.i.{norm1,attn.qkv,attn.proj,ls1.gamma,norm2,mlp.fc1,mlp.fc2,ls2.gamma}``, ``norm``), so a
2D timm state dict loads without renaming (``load_state_dict(strict=False)``: timm's ``head.*`` is
unexpected and ssl_med's ``mask_token`` missing) and gives the same outputs:
``pooled == timm.forward_features(x)[:, 0]`` and ``patch_tokens == timm.forward_features(x)[:, 1:]``.

**Channel tokens** (``channel_tokens``): ``fused`` (default) is the ViT above, one token per patch
mixing all input channels in its patch embedding. ``per_modality`` tokenises each input channel
(MRI sequence) separately, as BM-MAE's encoder (Robinet et al. 2025, Lucas-rbnt/BM-MAE
``bmmae/tokenizers.py``: one patch tokeniser per modality, the tokens of all modalities concatenated
for one transformer): one patch kernel per channel (:class:`~backbones.channel_tokens.ModalityPatchEmbed`,
a grouped convolution) plus a learned embedding per channel (``modality_embed`` ``(C, D)``), and
attention over all ``P + C x N`` tokens (:class:`~backbones.channel_tokens.ChannelTokenEncoder`, the
sequence model ChAda-ViT uses too). The channels stay the fixed input slots (``in_chans``, in
``data.channels`` order); ``channel_padding_mask`` ``(B, C)`` leaves absent ones out of the sequence,
``token_keep_idx`` selects single (channel, patch) tokens (``objective=bm_mae``), ``patch_tokens`` is
the mean over the present channels. ``objective=bm_mae`` selects it (``conf/backbone/vit.yaml`` reads
``objective.channel_tokens``).

Weights from elsewhere are read by :func:`read_state_dict` and converted by :func:`checkpoint_filter_fn`
(``init_from=`` does both for a file):

* **layouts** (:mod:`backbones.vit_layouts`): :func:`read_state_dict` detects the layout
  (``CHECKPOINT_LAYOUTS``) and renames to timm's keys first: timm / ssl_med as they are; official
  DINOv2 (facebookresearch/dinov2 ``*_pretrain.pth``, ``teacher.backbone.*``/``student.backbone.*``
  training checkpoints, chunked blocks, ``register_tokens``, ``(1, D)`` mask token) by
  ``dinov2_to_timm``; transformers ``Dinov2Model`` (RAD-DINO's ``model.safetensors``; q/k/v
  concatenated into ``attn.qkv``) by ``hf_dinov2_to_timm``. Both carry LayerScale, so the model needs
  ``init_values`` set; SwiGLU MLPs (ViT-g) are rejected;
* **channels**: :func:`adapt_input_channels` (3 -> 1 channel sums the RGB kernels, so a grey image
  gives the embedding of the same image repeated to RGB; more channels repeat and rescale);
* **2D -> 3D**: :func:`inflate_patch_embed` replicates the 2D kernel over the depth of the 3D patch
  and divides by that depth, so an input that is constant along depth gives exactly the 2D patch
  embedding; the 2D position table is resampled in-plane and repeated over depth;
* **grid / patch size**: learned position tables are resampled to the model's grid (bicubic 2D,
  trilinear 3D), patch kernels of another size with timm's ``resample_patch_embed``;
* **prefix rows**: timm models with ``no_embed_class=True`` (no position for the CLS token) get a zero
  CLS position row; position rows of register tokens are folded into ``reg_token`` (both exact);
* **per-modality kernels**: a fused kernel is summed to one channel (as for ChAda-ViT) and given to
  every modality; ``modality_embed`` stays at its init.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from functools import partial
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from backbones.channel_tokens import ChannelTokenEncoder, ModalityPatchEmbed, missing_slots
from backbones.vit_layouts import to_timm_layout
from ssl_med.encoder import EncoderOutput, TokenEncoder, size_preset
from ssl_med.layers.attention import AttnImpl
from ssl_med.layers.pos_embed import resample_pos_embed
from ssl_med.layers.transformer import Block
from ssl_med.registry import BACKBONES

log = logging.getLogger(__name__)

#: (embed_dim, depth, num_heads) per size, as timm.
VIT_SIZES: dict[str, tuple[int, int, int]] = {
    "tiny": (192, 12, 3),
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}

#: keys of timm/ssl_med checkpoints that an encoder does not use (classifier heads, pooling norms).
IGNORED_PREFIXES = ("head.", "head_drop.", "fc_norm.", "attn_pool.")


@BACKBONES.register("vit")
class VisionTransformer(ChannelTokenEncoder):
    """ViT encoder, 2D or 3D.

    Args:
        spatial_dims: 2 or 3.
        in_chans: input channels.
        img_size: input size the learned position table is made for; other multiples of the
            patch are interpolated.
        patch_size: int or one per axis.
        size: ``tiny|small|base|large`` (timm's widths); ``embed_dim``/``depth``/``num_heads`` given
            explicitly override it.
        mlp_ratio: MLP hidden width / D.
        qkv_bias: bias on the qkv projection.
        drop_path_rate: stochastic depth, linearly increasing over blocks.
        init_values: LayerScale init (``None``: no layer scale).
        pos_embed: ``learned`` or ``sincos``.
        class_token: use a CLS token (pooled embedding); else mean pooling.
        num_register_tokens: DINOv2-style registers.
        attn_impl: ``auto|sdpa|xformers|math``.
        init_from: optional local weights file (timm, ssl_med, official DINOv2 or transformers
            ``Dinov2Model`` state dict: ``.pth/.pt/.bin/.ckpt``, ``.safetensors``, or an export
            folder) loaded through :func:`read_state_dict` and :func:`checkpoint_filter_fn`; nothing
            is downloaded.
        channel_tokens: ``fused`` (one token per patch) or ``per_modality`` (one per channel and
            patch, see the module docstring).

    Shapes: ``(B, in_chans, *S) ->`` :class:`~ssl_med.encoder.EncoderOutput` with ``pooled (B, D)``,
    ``patch_tokens (B, N, D)``, ``N = prod(S_i / p_i)``; the sequence has ``P + N`` tokens
    (``fused``) or ``P + in_chans * N`` (``per_modality``).
    """

    block_classes = (Block,)  # FSDP's per-block unit (Encoder.block_classes)

    def __init__(
        self,
        spatial_dims: int = 2,
        in_chans: int = 1,
        img_size: int | Sequence[int] = 224,
        patch_size: int | Sequence[int] = 16,
        size: Literal["tiny", "small", "base", "large"] = "tiny",
        embed_dim: int | None = None,
        depth: int | None = None,
        num_heads: int | None = None,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        init_values: float | None = None,
        pos_embed: Literal["learned", "sincos"] = "learned",
        class_token: bool = True,
        num_register_tokens: int = 0,
        attn_impl: AttnImpl = "auto",
        init_from: str | None = None,
        channel_tokens: Literal["fused", "per_modality"] = "fused",
    ) -> None:
        if channel_tokens not in ("fused", "per_modality"):
            raise ValueError(f"channel_tokens must be 'fused' or 'per_modality', got {channel_tokens!r}")
        embed_dim, depth, num_heads = size_preset("ViT", VIT_SIZES, size, embed_dim, depth, num_heads)
        super().__init__(
            spatial_dims=spatial_dims,
            in_chans=in_chans,
            patch_size=patch_size,
            embed_dim=embed_dim,
            depth=depth,
            img_size=img_size,
            pos_embed=pos_embed,
            class_token=class_token,
            num_register_tokens=num_register_tokens,
            pos_embed_prefix=class_token,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
        )
        self.num_heads = num_heads
        self.channel_tokens = channel_tokens
        self.tokens_per_channel = channel_tokens == "per_modality"
        self.attn_impl = attn_impl
        if self.tokens_per_channel:
            self.patch_embed = ModalityPatchEmbed(spatial_dims, self.patch_size, in_chans, embed_dim)
            self.modality_embed = nn.Parameter(torch.zeros(in_chans, embed_dim))
            nn.init.trunc_normal_(self.modality_embed, std=0.02)
        self.blocks = build_blocks(
            embed_dim, depth, num_heads, mlp_ratio, qkv_bias, drop_path_rate, init_values, attn_impl
        )
        self.apply(init_weights)
        if init_from:
            load_pretrained_weights(self, init_from, allowed_missing=("modality_embed",))

    def forward(
        self,
        x: Tensor,
        *,
        mask: Tensor | None = None,
        keep_idx: Tensor | None = None,
        return_layers: Sequence[int] = (),
        channel_names: Sequence[Sequence[str]] | None = None,
        channel_padding_mask: Tensor | None = None,
        token_keep_idx: Tensor | None = None,
    ) -> EncoderOutput:
        """Encode ``x`` ``(B, in_chans, *S)``: the skeleton's forward with ``fused`` tokens; with
        ``per_modality`` tokens also ``channel_padding_mask`` ``(B, C)`` (True = the sequence is absent:
        its tokens are left out) and ``token_keep_idx`` ``(B, K)`` (indices ``c * N + n``: only those
        tokens enter the blocks, ``patch_tokens`` is then ``(B, K, D)``)."""
        if not self.tokens_per_channel:
            if channel_padding_mask is not None or token_keep_idx is not None:
                raise ValueError(
                    "channel_padding_mask and token_keep_idx need one token per (channel, patch): "
                    "backbone.channel_tokens=per_modality"
                )
            return super().forward(x, mask=mask, keep_idx=keep_idx, return_layers=return_layers, channel_names=channel_names)
        if channel_names is not None:
            raise ValueError(
                "a ViT's modalities are its input slots (data.channels order), not names: drop channel_names "
                "and mark absent sequences with channel_padding_mask"
            )
        if x.ndim != self.spatial_dims + 2 or x.shape[1] != self.in_chans:
            raise ValueError(f"expected ({'B, C, D, H, W' if self.spatial_dims == 3 else 'B, C, H, W'}) with "
                             f"C = in_chans = {self.in_chans}, got shape {tuple(x.shape)}")  # fmt: skip
        b, c = x.shape[:2]
        missing = missing_slots(torch.zeros(b, c, dtype=torch.bool, device=x.device), channel_padding_mask)
        ids = torch.arange(c, device=x.device).expand(b, c)
        return self.encode_channels(
            x, missing, ids, mask=mask, keep_idx=keep_idx, return_layers=return_layers, token_keep_idx=token_keep_idx
        )

    def embed_channels(self, x: Tensor, present: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        """Per-modality tokens ``(B, C, N, D)`` of ``x`` ``(B, C, *S)``, zeros where ``present`` ``(B, C)``
        is False (an absent sequence's content, even non-finite, never reaches the blocks)."""
        tokens, grid = self.patch_embed(x)
        if not bool(present.all()):
            tokens = torch.where(present[:, :, None, None], tokens, tokens.new_zeros(()))
        return tokens, grid

    def channel_table(self) -> Tensor:
        """``(C, D)``: the learned embedding of each input slot (modality)."""
        return self.modality_embed

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | ({"modality_embed"} if self.tokens_per_channel else set())


def build_blocks(
    embed_dim: int,
    depth: int,
    num_heads: int,
    mlp_ratio: float,
    qkv_bias: bool,
    drop_path_rate: float,
    init_values: float | None,
    attn_impl: AttnImpl,
) -> nn.ModuleList:
    """``depth`` pre-norm blocks with stochastic depth rising linearly from 0 to ``drop_path_rate``."""
    rates = [drop_path_rate * i / max(depth - 1, 1) for i in range(depth)]
    return nn.ModuleList(
        Block(embed_dim, num_heads, mlp_ratio, qkv_bias, rates[i], init_values, attn_impl)
        for i in range(depth)
    )


def init_weights(module: nn.Module) -> None:
    """timm's ViT init for linear layers: trunc-normal(0.02) weights, zero bias."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)


# -- weight conversion ------------------------------------------------------------------------------


def adapt_input_channels(weight: Tensor, in_chans: int) -> Tensor:
    """Adapt a patch-embedding kernel ``(D, C_src, *k)`` (2D or 3D) to ``in_chans`` input channels.

    ``in_chans == 1`` sums the source channels: the 1-channel model on ``x`` equals the source model on
    ``x`` repeated ``C_src`` times. More channels repeat the source channels cyclically and scale by
    ``C_src / in_chans`` (timm's ``adapt_input_conv`` rule; the response to a constant image is kept
    exactly when ``in_chans`` is a multiple of ``C_src``).

    Returns:
        ``(D, in_chans, *k)`` in the dtype of ``weight``.
    """
    src = weight.shape[1]
    if in_chans < 1:
        raise ValueError(f"in_chans must be positive, got {in_chans}")
    if in_chans == src:
        return weight
    w = weight.float()
    if in_chans == 1:
        w = w.sum(dim=1, keepdim=True)
    else:
        reps = [1, math.ceil(in_chans / src)] + [1] * (w.ndim - 2)
        w = w.repeat(reps)[:, :in_chans] * (src / in_chans)
    return w.to(weight.dtype)


def inflate_patch_embed(weight: Tensor, depth: int) -> Tensor:
    """Inflate a 2D patch kernel ``(D, C, ph, pw)`` to 3D ``(D, C, depth, ph, pw)``.

    The kernel is replicated over ``depth`` and divided by it, so a volume that is constant along the
    depth axis within each patch gives exactly the 2D embedding of its slice (I3D-style inflation).
    """
    if weight.ndim != 4:
        raise ValueError(f"expected a 2D kernel (D, C, ph, pw), got shape {tuple(weight.shape)}")
    return weight[:, :, None].expand(-1, -1, depth, -1, -1).contiguous() / depth


def _source_grid(num_tokens: int, spatial_dims: int) -> tuple[int, ...] | None:
    side = round(num_tokens ** (1 / spatial_dims))
    return (side,) * spatial_dims if side**spatial_dims == num_tokens else None


def checkpoint_filter_fn(state_dict: Mapping[str, Tensor], model: TokenEncoder) -> dict[str, Tensor]:
    """Convert a timm ``VisionTransformer`` or ssl_med ViT state dict to ``model``'s layout and shapes.

    Keys keep their names (timm's and ssl_med's agree); ``head.*``/``fc_norm.*`` are dropped. Handles
    input-channel count (:func:`adapt_input_channels`), 2D -> 3D (:func:`inflate_patch_embed`, position
    table repeated over depth), patch size (timm's ``resample_patch_embed``), grid size (position
    table resampled), timm's ``no_embed_class`` and register layouts (see the module docstring).
    A fixed sin-cos table of ``model`` is kept, not overwritten. Shapes that cannot be converted are
    left as they are, so ``load_state_dict`` reports them.

    Args:
        state_dict: source weights (already unwrapped, without a module prefix).
        model: the ssl_med encoder to load into (a ViT or a ChAda-ViT).

    Returns:
        A new state dict for ``model.load_state_dict(..., strict=False)``.
    """
    own = model.state_dict()
    out: dict[str, Tensor] = {}
    for key, value in state_dict.items():
        if key.startswith(IGNORED_PREFIXES):
            continue
        if key == "patch_embed.proj.weight" and key in own:
            value = _convert_patch_kernel(value, own[key], model)
        elif key == "patch_embed.proj.bias" and key in own:
            value = _per_modality(value, own[key].shape[0])
        elif key == "pos_embed" and key in own:
            if not model.pos_embed.requires_grad:  # fixed sin-cos table: keep the model's
                continue
            value, reg_pos = _convert_pos_embed(value, state_dict, model)
            if reg_pos is not None and "reg_token" in state_dict and "reg_token" in own:
                out["reg_token"] = state_dict["reg_token"] + reg_pos
        elif key == "reg_token" and key in out:
            continue  # already folded with its position rows
        out[key] = value
    return out


def _convert_patch_kernel(w: Tensor, target: Tensor, model: TokenEncoder) -> Tensor:
    from timm.layers import resample_patch_embed

    if w.ndim == 3:  # timm stores some kernels as Linear (D, p*p*C); not supported here
        return w
    target_k = tuple(target.shape[2:])
    if w.ndim == 4 and target.ndim == 5:  # 2D -> 3D
        if tuple(w.shape[2:]) != target_k[1:]:
            w = resample_patch_embed(w, list(target_k[1:]), verbose=False)
        w = inflate_patch_embed(w, target_k[0])
    elif w.ndim == target.ndim and tuple(w.shape[2:]) != target_k and w.ndim == 4:
        w = resample_patch_embed(w, list(target_k), verbose=False)
    if w.ndim == target.ndim and w.shape[1] != target.shape[1]:
        w = adapt_input_channels(w, target.shape[1])
    return _per_modality(w, target.shape[0])


def _per_modality(value: Tensor, rows: int) -> Tensor:
    """A fused kernel ``(D, ...)`` or bias ``(D,)`` repeated for the ``rows / D`` modalities of a
    :class:`~backbones.channel_tokens.ModalityPatchEmbed` (``(M * D, 1, *p)``); other shapes unchanged."""
    if value.shape[0] == rows or rows % value.shape[0]:
        return value
    return value.repeat(rows // value.shape[0], *[1] * (value.ndim - 1))


def _convert_pos_embed(
    pos: Tensor, state_dict: Mapping[str, Tensor], model: TokenEncoder
) -> tuple[Tensor, Tensor | None]:
    """Source ``(1, P + N_src, D)`` -> model ``(1, num_pos_prefix + N, D)``, and the register rows."""
    target = model.pos_embed
    if pos.shape == target.shape:
        return pos, None
    pos = pos.reshape(1, -1, pos.shape[-1])
    has_cls = "cls_token" in state_dict
    n_reg = state_dict["reg_token"].shape[1] if "reg_token" in state_dict else 0
    src_nd = 2 if state_dict.get("patch_embed.proj.weight", torch.empty(0, 0, 1, 1)).ndim == 4 else 3
    grid = None
    prefix_rows = 0
    for prefix_rows in (int(has_cls) + n_reg, int(has_cls), 0):  # timm: cls+reg rows, cls row, none
        grid = _source_grid(pos.shape[1] - prefix_rows, src_nd)
        if grid is not None:
            break
    if grid is None:
        return pos, None  # unknown layout: load_state_dict reports the shape mismatch
    prefix, patches = pos[:, :prefix_rows], pos[:, prefix_rows:]
    cls_row = prefix[:, :1] if has_cls and prefix_rows else None
    reg_rows = prefix[:, int(has_cls) :] if prefix_rows > int(has_cls) else None

    new_grid = model.base_grid
    if src_nd == 2 and len(new_grid) == 3:  # 2D table -> in-plane resample, repeat over depth
        patches = resample_pos_embed(patches, grid, new_grid[1:])
        patches = patches.reshape(1, 1, -1, patches.shape[-1]).expand(-1, new_grid[0], -1, -1)
        patches = patches.reshape(1, -1, patches.shape[-1])
    elif len(grid) == len(new_grid):
        patches = resample_pos_embed(patches, grid, new_grid)
    else:
        return pos, None
    if model.num_pos_prefix:
        cls_row = cls_row if cls_row is not None else patches.new_zeros(1, 1, patches.shape[-1])
        patches = torch.cat([cls_row, patches], dim=1)
    return patches, reg_rows


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """Read ViT weights from a local file or ssl_med export folder, in timm's names.

    Accepts ``.safetensors``, torch pickles (``.pth/.pt/.bin/.ckpt``; ``{"model": ...}``,
    ``{"state_dict": ...}``, ``{"teacher": ...}`` or a bare state dict) and export folders
    (``model.safetensors``), holding timm, ssl_med, official DINOv2 or transformers ``Dinov2Model``
    weights; module prefixes are stripped and keys renamed by :func:`to_timm_layout`.
    """
    path = Path(path)
    if path.is_dir():
        path = path / "model.safetensors"
    if not path.is_file():
        raise FileNotFoundError(f"init_from: no weights file at {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state: Mapping = load_file(str(path))
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("model", "state_dict", "teacher", "module"):
        if isinstance(state, Mapping) and wrapper in state and isinstance(state[wrapper], Mapping):
            state = state[wrapper]
    try:
        return to_timm_layout(state)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err


def load_pretrained_weights(
    model: TokenEncoder, path: str | Path, allowed_missing: Sequence[str] = ()
) -> tuple[list[str], list[str]]:
    """Load a local ViT checkpoint into ``model``: :func:`read_state_dict`, then :func:`checkpoint_filter_fn`.

    ``mask_token`` and ``reg_token`` (and ``allowed_missing`` prefixes) may be absent from the file;
    any other missing or unexpected key, or a shape that could not be converted, is an error. Weights
    with LayerScale (``blocks.i.ls1.gamma``, as all DINOv2 / RAD-DINO checkpoints) need a model built
    with ``init_values`` set (its value is then replaced by the loaded gammas).

    Returns:
        ``(missing, unexpected)`` keys as reported by ``load_state_dict``.
    """
    state = checkpoint_filter_fn(read_state_dict(path), model)
    own = model.state_dict()
    source_ls, model_ls = (any(k.endswith(".ls1.gamma") for k in d) for d in (state, own))
    if source_ls and not model_ls:
        raise ValueError(
            f"init_from {path}: the weights have LayerScale (blocks.*.ls1.gamma) but the model was built "
            "without it; set backbone.init_values (e.g. 1e-5; the loaded gammas replace it)"
        )
    if model_ls and not source_ls:
        raise ValueError(
            f"init_from {path}: the model has LayerScale but the weights have none (timm-style ViT); "
            "set backbone.init_values=null"
        )
    bad_shapes = [k for k, v in state.items() if k in own and own[k].shape != v.shape]
    if bad_shapes:
        detail = ", ".join(f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in bad_shapes[:5])
        raise ValueError(f"init_from {path}: cannot convert shapes ({detail})")
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed = ("mask_token", "reg_token", *allowed_missing)
    fatal_missing = [k for k in missing if not k.startswith(allowed)]
    if fatal_missing or unexpected:
        raise ValueError(f"init_from {path}: missing {fatal_missing[:5]}, unexpected {list(unexpected)[:5]}")
    log.info("initialised %s from %s (left at init: %s)", type(model).__name__, path, missing)
    return list(missing), list(unexpected)
