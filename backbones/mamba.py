"""Vision Mamba (Vim) for 2D and 3D inputs (``backbone=mamba``), with multi-order scans.

Architecture (hustvl/Vim ``vim/models_mamba.py``, bimamba "v2" mixer from its vendored mamba-ssm):
patch embedding -> (+ learned positions) -> CLS token in the *middle* of the sequence -> ``depth``
pre-norm blocks ``x <- x + drop_path(mixer(norm(x)))`` -> final norm -> CLS token.

The mixer (:class:`MultiScanMamba`) shares ``in_proj`` (x and gate z) and ``out_proj`` across scan
orders; each order has its own :class:`ScanBranch` (causal depthwise conv1d + SiLU, ``x_proj``,
``dt_proj``, ``A_log``, ``D``) and runs the selective scan (:mod:`ssl_med.ops.selective_scan`) over the
sequence permuted into that order (:mod:`ssl_med.ops.scan_order`); the gated outputs are permuted back and averaged. The K orders run
as one batch (:func:`scan_branches`): order ``k`` in channels ``k E .. (k + 1) E`` of one conv, one
scan call and batched projections, so the op count per block does not grow with K.

Scan orders (``scan_orders``) are strings of axis letters from slowest to fastest (2D ``h, w``;
3D ``d, h, w``) with an optional ``_rev`` suffix for the reversed sequence:

* 2D default ``("hw", "hw_rev")``: raster + reverse = Vim v2 exactly.
* 3D default ``("dhw", "dhw_rev", "hwd")``: SegMamba's tri-orientated Mamba (forward, reverse, and
  the inter-slice scan that walks through all depth slices of each ``(h, w)`` position).

Prefix (CLS) tokens keep their sequence index in every forward order (the middle for Vim); a
``_rev`` order flips the whole forward sequence, prefix included, as Vim does. With ``keep_idx``
(visible-only forward) each order visits the *kept* tokens in that order of their grid coordinates,
so a sample's scans do not depend on how its ``keep_idx`` is sorted.

Deviations from the reference (deliberate):

* Residual stream: Vim carries ``(hidden, residual)`` pairs ("Add -> Norm -> Mixer"); this is the same
  computation written as ``x + drop_path(mixer(norm(x)))`` with drop-path rate ``linspace(0, r, depth)[i]``
  on block ``i``'s output, which is what Vim's shifted schedule amounts to.
* Every scan branch gets the reference dt/A/D initialisation; Vim leaves its backward ``dt_proj_b`` at
  PyTorch's default init with a zeroed bias (initial backward dt = softplus(0) = 0.69), a quirk
  dropped here. SegMamba sums its three scans; this averages them (``divide_out``, Vim's ``/2``).
* The CLS position embedding is the first row of ``pos_embed`` (timm layout) instead of Vim's row
  ``M // 2``; positions are interpolated for other input sizes (Vim asserts one size).
* Parameter names: Vim's ``mixer.{conv1d, x_proj, dt_proj, A_log, D}`` are ``mixer.branches.0.*`` here
  and its ``*_b`` / ``A_b_log`` are ``mixer.branches.1.*``. The patch embedding keeps PyTorch's conv init.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial
from typing import Literal

import torch
from timm.layers import DropPath
from torch import Tensor, nn

from ssl_med.encoder import TokenEncoder, TokenLayout, size_preset
from ssl_med.ops.scan_order import (
    AXES,
    DEFAULT_ORDERS,
    OrderIndex,
    invert,
    is_sequence_order,
    parse_order,
    sequence_order,
)
from ssl_med.ops.selective_scan import ScanImpl, causal_conv1d, selective_scan
from ssl_med.registry import BACKBONES

#: (embed_dim, depth) per size, as Vim's ``vim_{tiny,small,base}_patch16_224``.
MAMBA_SIZES: dict[str, tuple[int, int]] = {"tiny": (192, 24), "small": (384, 24), "base": (768, 24)}


# ---------------------------------------------------------------------------------------------
# mixer
# ---------------------------------------------------------------------------------------------
class ScanBranch(nn.Module):
    """One scan direction of the mixer: conv1d + SiLU, x_proj, dt_proj, selective scan, gate.

    Args:
        d_inner: channels E of the scanned sequence.
        d_state: state size N.
        d_conv: causal conv width.
        dt_rank: rank of the dt projection.
        dt_min, dt_max, dt_init_floor: range of the initial step sizes ``softplus(dt_proj.bias)``.
        scan_impl: selective-scan backend.
    """

    def __init__(
        self,
        d_inner: int,
        d_state: int,
        d_conv: int,
        dt_rank: int,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        dt_init_floor: float = 1e-4,
        scan_impl: ScanImpl = "auto",
    ) -> None:
        super().__init__()
        self.d_state, self.dt_rank, self.scan_impl = d_state, dt_rank, scan_impl
        self.conv1d = nn.Conv1d(d_inner, d_inner, d_conv, groups=d_inner, padding=d_conv - 1, bias=True)
        self.x_proj = nn.Linear(d_inner, dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(dt_rank, d_inner, bias=True)
        nn.init.uniform_(self.dt_proj.weight, -(dt_rank**-0.5), dt_rank**-0.5)
        dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_init_floor)
        with torch.no_grad():  # inverse softplus: softplus(bias) == dt
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))
        self.dt_proj.bias._no_reinit = True  # type: ignore[attr-defined]
        a = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1)
        self.A_log = nn.Parameter(torch.log(a))  # S4D-real: A = -[1..N]
        self.D = nn.Parameter(torch.ones(d_inner))
        self.A_log._no_weight_decay = True  # type: ignore[attr-defined]
        self.D._no_weight_decay = True  # type: ignore[attr-defined]

    def forward(self, x: Tensor, z: Tensor) -> Tensor:
        """``x, z`` ``(B, E, L)`` in scan order -> gated scan output ``(B, E, L)``."""
        return scan_branches([self], x, z).transpose(1, 2)


def scan_branches(branches: Sequence[ScanBranch], x: Tensor, z: Tensor) -> Tensor:
    """K branches at once: conv + SiLU, ``x_proj``, ``dt_proj``, one selective scan, gate.

    Branch ``k`` owns channels ``k E .. (k + 1) E``: the convs are one depthwise conv over ``K E``
    channels, the projections one batched product each, and the scan one call whose input-dependent
    B and C have K groups (branch ``k``'s channels read group ``k``), so the op count does not grow
    with the number of scan orders.

    Args:
        branches: the K :class:`ScanBranch` modules (their parameters, one scan backend).
        x, z: ``(B, K E, L)``, branch ``k``'s sequence in its scan order in its channels.

    Returns:
        ``(B, L, K E)`` gated scan outputs (contiguous for the fused CPU scan, which writes token-major).
    """
    first = branches[0]
    k, (batch, width, length) = len(branches), x.shape
    e, rank, n = width // k, first.dt_rank, first.d_state
    conv_w = torch.cat([b.conv1d.weight for b in branches])
    conv_b = torch.cat([b.conv1d.bias for b in branches])
    x = causal_conv1d(x, conv_w, conv_b, activation="silu", impl=first.scan_impl)
    xk = x.transpose(1, 2).reshape(batch * length, k, e)
    dbl = torch.einsum("ske,kfe->skf", xk, torch.stack([b.x_proj.weight for b in branches]))  # (BL, K, R+2N)
    dt, b_in, c_in = torch.split(dbl, [rank, n, n], dim=-1)
    delta = torch.einsum("skr,ker->ske", dt, torch.stack([b.dt_proj.weight for b in branches]))
    delta = delta.reshape(batch, length, width).transpose(1, 2)  # bias goes in as delta_bias

    def grouped(t: Tensor) -> Tensor:  # (BL, K, N) -> (B, K, N, L)
        return t.reshape(batch, length, k, n).permute(0, 2, 3, 1)

    y = selective_scan(
        x,
        delta,
        -torch.exp(torch.cat([b.A_log for b in branches]).float()),
        grouped(b_in),
        grouped(c_in),
        D=torch.cat([b.D for b in branches]).float(),
        z=z,
        delta_bias=torch.cat([b.dt_proj.bias for b in branches]).float(),
        delta_softplus=True,
        impl=first.scan_impl,
    )
    return y.transpose(1, 2)


class MultiScanMamba(nn.Module):
    """Mamba mixer over several scan orders sharing ``in_proj``/``out_proj`` (Vim bimamba v2 for 2 orders).

    Args:
        d_model: token width D.
        num_orders: K scan orders (one :class:`ScanBranch` each).
        d_state, d_conv, expand: Mamba's N, conv width and ``E = expand * D``.
        dt_rank: ``"auto"`` = ``ceil(D / 16)``.
        divide_out: average the K branch outputs (Vim ``if_divide_out``); else sum (SegMamba).
        scan_impl: selective-scan backend.
    """

    def __init__(
        self,
        d_model: int,
        num_orders: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | Literal["auto"] = "auto",
        divide_out: bool = True,
        scan_impl: ScanImpl = "auto",
    ) -> None:
        super().__init__()
        d_inner = expand * d_model
        rank = math.ceil(d_model / 16) if dt_rank == "auto" else dt_rank
        self.divide_out = divide_out
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.branches = nn.ModuleList(
            ScanBranch(d_inner, d_state, d_conv, rank, scan_impl=scan_impl) for _ in range(num_orders)
        )
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def forward(
        self, h: Tensor, orders: OrderIndex | Sequence[Tensor | None], inverses: Sequence[Tensor | None] | None = None
    ) -> Tensor:
        """``h`` ``(B, L, D)`` -> ``(B, L, D)``.

        Args:
            h: ``(B, L, D)`` normed tokens in sequence order.
            orders: one ``(B, L)`` permutation per branch (``seq[:, orders[k]]`` is branch ``k``'s scan
                order), or ``None`` for a branch that scans the sequence as it is laid out; or their
                :class:`OrderIndex`, built once for all blocks.
            inverses: the permutations' inverses (computed when not given).
        """
        xz = self.in_proj(h)  # (B, L, 2E)
        if not isinstance(orders, OrderIndex):
            if inverses is None:
                inverses = [None if p is None else invert(p) for p in orders]
            orders = OrderIndex(orders, inverses, h.shape[0], h.shape[1], h.device)
        x, z = orders.spread_xz(xz)  # (B, K E, L) each
        total = orders.merge_outputs(scan_branches(self.branches, x, z))  # (B, L, E)
        if self.divide_out:
            total = total / len(self.branches)
        return self.out_proj(total)


class MambaBlock(nn.Module):
    """``x + drop_path(mixer(norm(x)))``; the residual stream optionally kept in float32.

    Args:
        dim: token width D.
        mixer: the :class:`MultiScanMamba`.
        norm_layer: RMSNorm or LayerNorm constructor.
        drop_path: stochastic-depth rate.
        residual_in_fp32: keep the residual stream in float32 (under autocast).
    """

    def __init__(
        self, dim: int, mixer: MultiScanMamba, norm_layer: type[nn.Module], drop_path: float, residual_in_fp32: bool
    ) -> None:
        super().__init__()
        self.norm = norm_layer(dim)
        self.mixer = mixer
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.residual_in_fp32 = residual_in_fp32

    def forward(
        self, x: Tensor, orders: OrderIndex | Sequence[Tensor | None], inverses: Sequence[Tensor | None] | None = None
    ) -> Tensor:
        """``x`` ``(B, L, D)`` -> ``(B, L, D)`` (float32 with ``residual_in_fp32``); ``orders``/``inverses``
        as :meth:`MultiScanMamba.forward`'s."""
        out = self.drop_path(self.mixer(self.norm(x.to(self.norm.weight.dtype)), orders, inverses))
        if self.residual_in_fp32:
            x = x.float()
        return x + out


# ---------------------------------------------------------------------------------------------
# the encoder
# ---------------------------------------------------------------------------------------------
@BACKBONES.register("mamba")
class VisionMamba(TokenEncoder):
    """Vision Mamba encoder, 2D or 3D.

    Input ``(B, C, H, W)`` or ``(B, C, D, H, W)``; tokens ``(B, L, D)`` with ``L = P + N`` (``P`` prefix
    tokens at ``cls_position``); outputs as :class:`ssl_med.encoder.EncoderOutput`.

    Args:
        spatial_dims: 2 or 3.
        in_chans: input channels.
        img_size: size the learned position table is made for; other multiples of the patch are
            interpolated.
        patch_size: int or one per axis.
        size: ``tiny|small|base`` (Vim: 192/384/768 wide, 24 deep); ``embed_dim``/``depth`` override.
        d_state, d_conv, expand, dt_rank: Mamba mixer sizes (16, 4, 2, ceil(D/16)).
        scan_orders: scan orders (see the module docstring); default 2D ``hw, hw_rev``,
            3D ``dhw, dhw_rev, hwd``.
        divide_out: average (True, Vim) or sum (False, SegMamba) the scan outputs.
        rms_norm: RMSNorm (Vim) instead of LayerNorm, eps 1e-5.
        residual_in_fp32: keep the residual stream in float32.
        drop_path_rate: stochastic depth, linear over blocks.
        class_token: use a CLS token (pooled embedding); else mean pooling.
        cls_position: ``middle`` (Vim) or ``first``.
        pos_embed: ``learned`` or ``sincos``.
        scan_impl: ``auto|cuda|fused|torch|ref`` (:func:`ssl_med.ops.selective_scan.selective_scan`).
    """

    block_classes = (MambaBlock,)  # FSDP's per-block unit (Encoder.block_classes)

    def __init__(
        self,
        spatial_dims: int = 2,
        in_chans: int = 1,
        img_size: int | Sequence[int] = 224,
        patch_size: int | Sequence[int] = 16,
        size: Literal["tiny", "small", "base"] = "tiny",
        embed_dim: int | None = None,
        depth: int | None = None,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | Literal["auto"] = "auto",
        scan_orders: Sequence[str] | None = None,
        divide_out: bool = True,
        rms_norm: bool = True,
        residual_in_fp32: bool = True,
        drop_path_rate: float = 0.0,
        class_token: bool = True,
        cls_position: Literal["first", "middle"] = "middle",
        pos_embed: Literal["learned", "sincos"] = "learned",
        scan_impl: ScanImpl = "auto",
    ) -> None:
        if spatial_dims not in AXES:
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        embed_dim, depth = size_preset("Mamba", MAMBA_SIZES, size, embed_dim, depth)
        orders = tuple(scan_orders) if scan_orders else DEFAULT_ORDERS[spatial_dims]
        for order in orders:
            parse_order(order, spatial_dims)
        norm = partial(nn.RMSNorm, eps=1e-5) if rms_norm else partial(nn.LayerNorm, eps=1e-5)
        super().__init__(
            spatial_dims=spatial_dims,
            in_chans=in_chans,
            patch_size=patch_size,
            embed_dim=embed_dim,
            depth=depth,
            img_size=img_size,
            pos_embed=pos_embed,
            class_token=class_token,
            cls_position=cls_position,
            pos_embed_prefix=class_token,
            norm_layer=norm,
        )
        self.scan_orders = orders
        rates = torch.linspace(0, drop_path_rate, depth).tolist()
        mixer = partial(
            MultiScanMamba,
            embed_dim,
            len(orders),
            d_state=d_state,
            d_conv=d_conv,
            expand=expand,
            dt_rank=dt_rank,
            divide_out=divide_out,
            scan_impl=scan_impl,
        )
        self.blocks = nn.ModuleList(
            MambaBlock(embed_dim, mixer(), norm, rates[i], residual_in_fp32) for i in range(depth)
        )
        self._orders_for: tuple[TokenLayout, torch.device, OrderIndex] | None = None
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)
        self.apply(partial(_init_weights, depth=depth))

    def scan_index(self, layout: TokenLayout, batch: int, length: int, device: torch.device) -> OrderIndex:
        """The :class:`OrderIndex` of the configured scan orders for this layout's ``(B, L)`` sequence
        (built once per forward and reused by every block)."""
        cached = self._orders_for
        if cached is not None and cached[0] is layout and cached[1] == device:
            return cached[2]
        perms = [
            None if is_sequence_order(o, layout) else sequence_order(o, layout, batch, device)
            for o in self.scan_orders
        ]
        inverses = [None if p is None else invert(p) for p in perms]
        index = OrderIndex(perms, inverses, batch, length, device)
        self._orders_for = (layout, device, index)
        return index

    def run_block(self, index: int, x: Tensor, layout: TokenLayout) -> Tensor:
        """Block ``index`` on ``x`` ``(B, L, D)`` scanned in every configured order."""
        return self.blocks[index](x, self.scan_index(layout, x.shape[0], x.shape[1], x.device))

    def no_weight_decay(self) -> set[str]:
        """Positions, prefix/mask tokens, and every ``A_log``/``D`` of the scan branches."""
        names = set(super().no_weight_decay())
        names |= {n for n, p in self.named_parameters() if getattr(p, "_no_weight_decay", False)}
        return names


def _init_weights(module: nn.Module, depth: int) -> None:
    """Vim/mamba-ssm init: Linear biases zero (except dt_proj's), ``out_proj`` rescaled by 1/sqrt(depth)."""
    if isinstance(module, nn.Linear) and module.bias is not None and not getattr(module.bias, "_no_reinit", False):
        nn.init.zeros_(module.bias)
    if isinstance(module, MultiScanMamba):
        nn.init.kaiming_uniform_(module.out_proj.weight, a=math.sqrt(5))
        with torch.no_grad():
            module.out_proj.weight /= math.sqrt(depth)
