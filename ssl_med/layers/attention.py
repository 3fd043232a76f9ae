"""Multi-head self-attention with a run-time choice of kernel.

``attn_impl``:
    * ``"sdpa"`` (default through ``"auto"`` on CPU): ``torch.nn.functional.scaled_dot_product_attention``;
    * ``"xformers"``: xformers' memory-efficient attention (CUDA, optional ``[cuda]`` extra, imported lazily);
    * ``"math"``: the plain softmax(QK^T/sqrt(d))V formula, the reference for tests;
    * ``"auto"``: xformers on CUDA when installed, else sdpa.
"""

from __future__ import annotations

import importlib.util
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


def attention(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Tensor | None = None, impl: str = "auto") -> Tensor:
    """Scaled dot-product attention.

    Args:
        q, k, v: ``(B, H, L, Dh)``.
        key_padding_mask: optional ``(B, L)`` bool, True where a key is padding (ignored).
        impl: see the module docstring.

    Returns:
        ``(B, H, L, Dh)``.
    """
    impl = resolve_attn_impl(impl, q.device)
    bias = None
    if key_padding_mask is not None:
        bias = torch.zeros(key_padding_mask.shape, dtype=q.dtype, device=q.device)
        bias = bias.masked_fill(key_padding_mask, float("-inf"))[:, None, None, :]
    if impl == "sdpa":
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    if impl == "math":
        scores = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
        if bias is not None:
            scores = scores + bias
        return scores.softmax(dim=-1) @ v
    import xformers.ops as xops  # optional, CUDA only

    if bias is not None:
        bias = bias.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_bias=bias)
    return out.transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention; parameter names (``qkv``, ``proj``) match timm's ``Attention``.

    Shapes: ``(B, L, D) -> (B, L, D)``.
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

    def forward(self, x: Tensor, key_padding_mask: Tensor | None = None) -> Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        out = attention(qkv[0], qkv[1], qkv[2], key_padding_mask, self.attn_impl)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(b, n, d)))
