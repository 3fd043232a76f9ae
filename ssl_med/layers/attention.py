"""Multi-head self-attention with a run-time choice of kernel, key-padding masks and packed sequences.

``attn_impl``:
    * ``"sdpa"`` (default through ``"auto"`` on CPU): ``torch.nn.functional.scaled_dot_product_attention``;
    * ``"xformers"``: xformers' memory-efficient attention (CUDA, optional ``[cuda]`` extra, imported lazily);
    * ``"math"``: the plain softmax(QK^T/sqrt(d))V formula, the reference for tests;
    * ``"auto"``: xformers on CUDA when installed, else sdpa.

Sequences of different lengths in one batch (ChAda-ViT images with different channel counts) can be
run two ways, with identical results on the valid tokens:

    * **padding**: ``(B, L_max, D)`` plus a ``key_padding_mask`` ``(B, L_max)`` (True = padding); every
      kernel supports it, the padded queries are computed and thrown away;
    * **packing**: :func:`pack_padded` concatenates the valid tokens of all images into one
      ``(1, T, D)`` sequence (``T = sum L_b``) and the attention gets ``seqlens=[L_1, ..., L_B]`` so that
      tokens attend only within their own image. With xformers this is a ``BlockDiagonalMask``
      (no padded FLOPs, no ``L x L`` mask in memory); sdpa/math build the equivalent dense block mask,
      which is only meant for tests and small inputs.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

AttnImpl = Literal["auto", "sdpa", "xformers", "math"]
ATTN_IMPLS = ("auto", "sdpa", "xformers", "math")


def _xformers_available() -> bool:
    return importlib.util.find_spec("xformers") is not None


def resolve_attn_impl(impl: str, device: torch.device) -> str:
    """Turn ``"auto"`` into a concrete kernel; reject unknown names and unusable choices."""
    if impl not in ATTN_IMPLS:
        raise ValueError(f"unknown attn_impl {impl!r}; choose one of {ATTN_IMPLS}")
    if impl == "auto":
        return "xformers" if device.type == "cuda" and _xformers_available() else "sdpa"
    if impl == "xformers" and not _xformers_available():
        raise ImportError("attn_impl='xformers' needs the optional dependency: pip install 'ssl_med[cuda]'")
    return impl


def _padding_bias(key_padding_mask: Tensor, dtype: torch.dtype, align: int = 1) -> Tensor:
    """``(B, L)`` bool (True = padding) -> additive bias ``(B, 1, 1, L)`` with ``-inf`` at padded keys.

    ``align > 1`` allocates the last axis rounded up to a multiple of ``align`` and returns a view of the
    first ``L`` columns (xformers wants bias rows aligned in memory).
    """
    b, length = key_padding_mask.shape
    padded = -(-length // align) * align
    bias = torch.zeros(b, 1, 1, padded, dtype=dtype, device=key_padding_mask.device)
    bias[..., :length].masked_fill_(key_padding_mask[:, None, None, :], float("-inf"))
    return bias[..., :length]


def _block_diagonal_bias(seqlens: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    """Dense ``(1, 1, T, T)`` additive bias: 0 within each segment of ``seqlens``, ``-inf`` across them."""
    segment = torch.repeat_interleave(
        torch.arange(len(seqlens), device=device), torch.as_tensor(list(seqlens), device=device)
    )
    same = segment[:, None] == segment[None, :]
    bias = torch.zeros(same.shape, dtype=dtype, device=device).masked_fill_(~same, float("-inf"))
    return bias[None, None]


def attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None = None,
    impl: str = "auto",
    seqlens: Sequence[int] | None = None,
) -> Tensor:
    """Scaled dot-product attention.

    Args:
        q: ``(B, H, Lq, Dh)``.
        k, v: ``(B, H, Lk, Dh)``.
        key_padding_mask: optional ``(B, Lk)`` bool, True where a key is padding (ignored). Every query
            must keep at least one valid key.
        impl: see the module docstring.
        seqlens: packed layout (self-attention only): ``B == 1``, ``Lq == Lk == sum(seqlens)``, and token
            ``t`` attends only to tokens of its own segment. Exclusive with ``key_padding_mask``.

    Returns:
        ``(B, H, Lq, Dh)``.
    """
    impl = resolve_attn_impl(impl, q.device)
    if seqlens is not None:
        if key_padding_mask is not None:
            raise ValueError("pass either key_padding_mask or seqlens, not both")
        total = sum(int(s) for s in seqlens)
        if q.shape[0] != 1 or q.shape[2] != total or k.shape[2] != total:
            raise ValueError(
                f"packed attention needs q, k, v of shape (1, H, sum(seqlens)={total}, Dh), got {tuple(q.shape)}"
            )
    if impl == "xformers":
        return _xformers_attention(q, k, v, key_padding_mask, seqlens)

    bias = None
    if key_padding_mask is not None:
        if key_padding_mask.shape != (k.shape[0], k.shape[2]):
            raise ValueError(
                f"key_padding_mask must be (B, Lk) = {(k.shape[0], k.shape[2])}, got {tuple(key_padding_mask.shape)}"
            )
        bias = _padding_bias(key_padding_mask, q.dtype)
    elif seqlens is not None:
        bias = _block_diagonal_bias(seqlens, q.dtype, q.device)
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    if bias is not None:
        scores = scores + bias
    return scores.softmax(dim=-1) @ v


def _xformers_attention(
    q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None, seqlens: Sequence[int] | None
) -> Tensor:
    import xformers.ops as xops  # optional, CUDA only

    bias: object | None = None
    if seqlens is not None:
        from xformers.ops.fmha.attn_bias import BlockDiagonalMask

        bias = BlockDiagonalMask.from_seqlens([int(s) for s in seqlens])
    elif key_padding_mask is not None:
        bias = _padding_bias(key_padding_mask, q.dtype, align=8).expand(
            q.shape[0], q.shape[1], q.shape[2], -1
        )
    # xformers layout is (B, L, H, Dh)
    out = xops.memory_efficient_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias
    )
    return out.transpose(1, 2)


def pack_padded(x: Tensor, key_padding_mask: Tensor) -> tuple[Tensor, list[int], Tensor]:
    """Drop padded tokens and concatenate the images into one packed sequence.

    Args:
        x: ``(B, L, D)``.
        key_padding_mask: ``(B, L)`` bool, True = padding.

    Returns:
        ``packed`` ``(1, T, D)`` with ``T`` the number of valid tokens (image after image, each in its
        original order), ``seqlens`` (valid tokens per image) and ``index`` ``(T,)``: the flat position
        ``b * L + l`` of each packed token, for :func:`unpack_padded`.
    """
    b, length, d = x.shape
    valid = ~key_padding_mask
    index = valid.reshape(-1).nonzero().squeeze(1)
    seqlens = valid.sum(dim=1).tolist()
    return x.reshape(b * length, d).index_select(0, index)[None], seqlens, index


def unpack_padded(packed: Tensor, index: Tensor, batch: int, length: int) -> Tensor:
    """Inverse of :func:`pack_padded`: ``(1, T, D)`` -> ``(B, L, D)`` with zeros at padded positions."""
    d = packed.shape[-1]
    out = packed.new_zeros(batch * length, d).index_copy(0, index, packed[0])
    return out.reshape(batch, length, d)


class Attention(nn.Module):
    """Multi-head self-attention; parameter names (``qkv``, ``proj``) match timm's ``Attention``.

    Shapes: ``(B, L, D) -> (B, L, D)``; with ``seqlens`` the input is a packed ``(1, T, D)`` sequence.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool = True,
        proj_drop: float = 0.0,
        attn_impl: AttnImpl = "auto",
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.attn_impl = attn_impl
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def forward(
        self, x: Tensor, key_padding_mask: Tensor | None = None, seqlens: Sequence[int] | None = None
    ) -> Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = attention(qkv[0], qkv[1], qkv[2], key_padding_mask, self.attn_impl, seqlens=seqlens)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, d)))
