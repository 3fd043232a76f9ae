"""Vision-LSTM backbone: block equations vs a plain re-statement, scan directions, visible-only forward,
mLSTM forms, sizes/inits, config, and a short training run on real demo crops."""

from __future__ import annotations

import copy
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from ssl_med.encoder import TokenLayout
from ssl_med.registry import BACKBONES

REPO = Path(__file__).resolve().parents[2]
F64 = torch.float64


def build(spatial_dims: int = 2, **kwargs: object) -> torch.nn.Module:
    torch.manual_seed(0)
    args = {"embed_dim": 32, "depth": 2, "patch_size": 4, "img_size": 16, "in_chans": 1}
    args.update(kwargs)
    return BACKBONES.build("xlstm", spatial_dims=spatial_dims, **args)


def randomise(module: torch.nn.Module, seed: int = 0) -> None:
    """Random values everywhere (the reference init has many zeros that would hide mistakes)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(0.3 * torch.randn(p.shape, generator=g, dtype=p.dtype))
            if name.endswith("fgate.bias"):
                p.add_(3.0)


# -- a plain restatement of one block (float64), sharing no code with backbones/xlstm.py ----------
def plain_block(block: torch.nn.Module, x: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
    p = {n: t.detach() for n, t in block.named_parameters()}
    lay = "layer."
    inner = p[lay + "learnable_skip"].numel()
    nh = p[lay + "mlstm_cell.igate.bias"].numel()

    def layer_norm(t: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, eps: float) -> torch.Tensor:
        mu = t.mean(-1, keepdim=True)
        var = ((t - mu) ** 2).mean(-1, keepdim=True)
        out = (t - mu) / torch.sqrt(var + eps) * (1.0 + w)
        return out if b is None else out + b

    def linear(t: torch.Tensor, name: str) -> torch.Tensor:
        out = t @ p[name + ".weight"].T
        return out + p[name + ".bias"] if name + ".bias" in p else out

    def blockdiag(t: torch.Tensor, name: str) -> torch.Tensor:
        w = torch.block_diag(*p[name + ".weight"])  # (inner, inner)
        out = t @ w.T
        return out + p[name + ".bias"] if name + ".bias" in p else out

    b_, length, _ = x.shape
    h = layer_norm(x, p["norm.weight"], p.get("norm.bias"), 1e-5)
    if block.reverse:
        h = h.flip(1)
    up = linear(h, lay + "proj_up")
    xm, z = up[..., :inner], up[..., inner:]
    conv_w, conv_b = p[lay + "conv.conv.weight"], p.get(lay + "conv.conv.bias")
    if conv_w.ndim == 3:  # causal 1D: out_t = sum_s w[s] x_{t-k+1+s}
        ksz = conv_w.shape[-1]
        padded = torch.cat([xm.new_zeros(b_, ksz - 1, inner), xm], 1)
        xc = sum(padded[:, s : s + length] * conv_w[:, 0, s] for s in range(ksz))
    else:  # grid conv, zero padding
        conv = F.conv2d if len(grid) == 2 else F.conv3d
        img = xm.transpose(1, 2).reshape(b_, inner, *grid)
        xc = conv(img, conv_w, None, padding=conv_w.shape[-1] // 2, groups=inner).flatten(2).transpose(1, 2)
    if conv_b is not None:
        xc = xc + conv_b
    xc = xc * torch.sigmoid(xc)
    q, k, v = blockdiag(xc, lay + "q_proj"), blockdiag(xc, lay + "k_proj"), blockdiag(xm, lay + "v_proj")
    gates_in = torch.cat([q, k, v], -1)
    i_pre, f_pre = linear(gates_in, lay + "mlstm_cell.igate"), linear(gates_in, lay + "mlstm_cell.fgate")
    dh = inner // nh
    heads = []
    for head in range(nh):  # unstabilised recurrence (float64, short sequence)
        sl = slice(head * dh, (head + 1) * dh)
        c_mem, n_mem, outs = torch.zeros(b_, dh, dh, dtype=F64), torch.zeros(b_, dh, dtype=F64), []
        for t in range(length):
            f_t = torch.sigmoid(f_pre[:, t, head])[:, None]
            i_t = torch.exp(i_pre[:, t, head])[:, None]
            k_t = k[:, t, sl] / math.sqrt(dh)
            c_mem = f_t[..., None] * c_mem + i_t[..., None] * k_t[:, :, None] * v[:, t, None, sl]
            n_mem = f_t * n_mem + i_t * k_t
            num = torch.einsum("bd,bde->be", q[:, t, sl], c_mem)
            den = (q[:, t, sl] * n_mem).sum(-1).abs().clamp(min=1.0)
            outs.append(num / den[:, None])
        hh = torch.stack(outs, 1)  # (B, L, DH): per-head norm
        mu, var = hh.mean(-1, keepdim=True), hh.var(-1, unbiased=False, keepdim=True)
        heads.append((hh - mu) / torch.sqrt(var + 1e-5))
    hn = torch.cat(heads, -1) * (1.0 + p[lay + "mlstm_cell.outnorm.weight"])
    if lay + "mlstm_cell.outnorm.bias" in p:
        hn = hn + p[lay + "mlstm_cell.outnorm.bias"]
    out = linear((hn + p[lay + "learnable_skip"] * xc) * (z * torch.sigmoid(z)), lay + "proj_down")
    if block.reverse:
        out = out.flip(1)
    return x + out


@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("version", ["v2", "v1"])
def test_block_matches_plain_equations(spatial_dims: int, version: str) -> None:
    model = build(spatial_dims, version=version, embed_dim=16).double()
    randomise(model)
    grid = (3, 4) if spatial_dims == 2 else (2, 3, 2)
    x = torch.randn(2, math.prod(grid), 16, generator=torch.Generator().manual_seed(1), dtype=F64)
    layout = TokenLayout(grid=grid, keep_idx=None, prefix_positions=())
    for block in model.blocks:  # block 0 forward, block 1 backward
        # the plain form has no eps in the mLSTM normaliser: eps-level differences (after the head norm)
        torch.testing.assert_close(block(x, layout), plain_block(block, x, grid), rtol=2e-5, atol=2e-5)


def test_directions_alternate_and_flip_is_an_involution() -> None:
    model = build(depth=4).double()
    randomise(model)
    assert [b.reverse for b in model.blocks] == [False, True, False, True]
    x = torch.randn(2, 16, 32, dtype=F64)
    backward = model.blocks[1]
    torch.testing.assert_close(backward.flip(backward.flip(x)), x, rtol=0, atol=0)
    assert not torch.equal(backward.flip(x), x)
    # the backward block is the forward block (same weights) applied to the reversed sequence
    forward = copy.deepcopy(backward)
    forward.reverse = False
    full = TokenLayout(grid=(4, 4), keep_idx=None, prefix_positions=())
    torch.testing.assert_close(backward(x, full), forward(x.flip(1), full).flip(1))
    # ... also with kept tokens: reversed order, positions in the reversed grid
    keep = torch.tensor([[0, 2, 5, 6, 11, 15], [1, 3, 4, 8, 9, 14]])
    xk = x[:, :6]
    rev_layout = TokenLayout(grid=(4, 4), keep_idx=15 - keep.flip(1), prefix_positions=())
    torch.testing.assert_close(
        backward(xk, TokenLayout(grid=(4, 4), keep_idx=keep, prefix_positions=())),
        forward(xk.flip(1), rev_layout).flip(1),
    )


def test_scan_direction_is_causal_in_v1() -> None:
    """v1 (causal conv): forward blocks ignore later tokens, backward blocks ignore earlier ones."""
    model = build(version="v1").double()
    randomise(model)
    layout = TokenLayout(grid=(4, 4), keep_idx=None, prefix_positions=())
    x = torch.randn(1, 16, 32, dtype=F64)
    x2 = x.clone()
    x2[:, 7] += 1.0
    fwd, bwd = model.blocks
    a, b = fwd(x, layout), fwd(x2, layout)
    torch.testing.assert_close(a[:, :7], b[:, :7], rtol=0, atol=1e-12)
    assert not torch.allclose(a[:, 7:], b[:, 7:])
    a, b = bwd(x, layout), bwd(x2, layout)
    torch.testing.assert_close(a[:, 8:], b[:, 8:], rtol=0, atol=1e-12)
    assert not torch.allclose(a[:, :8], b[:, :8])


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_visible_only_forward(spatial_dims: int) -> None:
    model = build(spatial_dims).double().eval()
    randomise(model)
    x = torch.randn(2, 1, *([16] * spatial_dims), dtype=F64)
    n = 4**spatial_dims
    with torch.no_grad():
        full = model(x)
        all_kept = model(x, keep_idx=torch.arange(n).expand(2, n))
    torch.testing.assert_close(all_kept.patch_tokens, full.patch_tokens)
    keep = torch.stack(
        [
            torch.randperm(n, generator=torch.Generator().manual_seed(s))[: n // 4].sort().values
            for s in (0, 1)
        ]
    )
    dropped = torch.ones(2, n, dtype=torch.bool).scatter(1, keep, False)
    # changing the pixels of dropped patches only: scale every pixel of a dropped patch
    patch_mask = dropped.reshape(2, 1, *([4] * spatial_dims))
    for axis in range(spatial_dims):
        patch_mask = patch_mask.repeat_interleave(4, dim=2 + axis)
    x2 = torch.where(patch_mask, x * 3.0 + 1.0, x)
    with torch.no_grad():
        a, b = model(x, keep_idx=keep), model(x2, keep_idx=keep)
    assert a.patch_tokens.shape == (2, n // 4, 32)
    torch.testing.assert_close(a.patch_tokens, b.patch_tokens, rtol=0, atol=1e-12)
    assert not torch.allclose(a.patch_tokens, full.patch_tokens.gather(1, keep[..., None].expand(-1, -1, 32)))


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_fused_grid_conv_gives_the_same_model(spatial_dims: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The C++ grid conv (CPU default) and ``nn.Conv2d/3d``: same outputs and parameter gradients, full
    grid and visible-only (kept tokens scattered into a zero grid)."""
    from ssl_med.ops import selective_scan_fused

    if not selective_scan_fused.fused_available():
        pytest.skip(f"fused CPU kernel unavailable: {selective_scan_fused.fused_status()}")
    model = build(spatial_dims).double()
    randomise(model)
    x = torch.randn(2, 1, *([16] * spatial_dims), dtype=F64)
    n = 4**spatial_dims
    keep = torch.stack([torch.randperm(n, generator=torch.Generator().manual_seed(s))[: n // 2] for s in (0, 1)])

    def run() -> list[torch.Tensor]:
        model.zero_grad()
        loss = sum(model(x, keep_idx=k).patch_tokens.square().sum() for k in (None, keep))
        loss.backward()
        return [loss.detach()] + [p.grad.clone() for p in model.parameters() if p.grad is not None]

    fused = run()
    monkeypatch.setattr(selective_scan_fused, "grid_conv_applies", lambda *inputs: False)
    for a, b in zip(fused, run(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_mlstm_forms_give_the_same_model(spatial_dims: int) -> None:
    model = build(spatial_dims, img_size=20).double().eval()
    randomise(model)
    x = torch.randn(1, 1, *([20] * spatial_dims), dtype=F64)  # 25 / 125 tokens: not a multiple of 8
    outs = {}
    for impl in ("parallel", "chunkwise", "recurrent"):
        model.set_mlstm_impl(impl, chunk_size=8)
        with torch.no_grad():
            outs[impl] = model(x).patch_tokens
    torch.testing.assert_close(outs["chunkwise"], outs["recurrent"], rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(outs["parallel"], outs["recurrent"], rtol=1e-4, atol=1e-4)  # eps-level


@pytest.mark.parametrize("dim", [32, 24, 20])  # 8, 6, 5 blocks of 4: groups of 4, 2 and 1 blocks
def test_headwise_projection_is_block_diagonal_with_gradients(dim: int) -> None:
    """The grouped product equals the dense block-diagonal map, also in its gradients."""
    from ssl_med.layers.vil import LinearHeadwise

    proj = LinearHeadwise(dim, 4).double()
    randomise(proj)
    x = torch.randn(2, 5, dim, dtype=F64, requires_grad=True)
    out = proj(x)
    want = x @ torch.block_diag(*proj.weight).T + proj.bias
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, [x, proj.weight, proj.bias], g)
    grads_want = torch.autograd.grad(want, [x, proj.weight, proj.bias], g)
    for got, expected in zip(grads, grads_want):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


def test_gate_preactivations_match_two_linears_with_gradients() -> None:
    """The stacked input/forget gate matmul equals the two separate linears, also in its gradients."""
    cell = build(embed_dim=16).double().blocks[0].layer.mlstm_cell
    randomise(cell)
    gate_in = torch.randn(2, 7, 3 * cell.dim, dtype=F64, requires_grad=True)
    i_pre, f_pre = cell.gate_preacts(gate_in)
    wrt = [gate_in, *cell.igate.parameters(), *cell.fgate.parameters()]
    grads = torch.autograd.grad((i_pre.sin() + f_pre.cos()).sum(), wrt)
    i_ref, f_ref = cell.igate(gate_in).transpose(1, 2), cell.fgate(gate_in).transpose(1, 2)
    grads_ref = torch.autograd.grad((i_ref.sin() + f_ref.cos()).sum(), wrt)
    assert i_pre.shape == f_pre.shape == (2, cell.num_heads, 7)
    torch.testing.assert_close((i_pre, f_pre), (i_ref, f_ref), rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, grads_ref):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_sizes_and_reference_init() -> None:
    tiny = BACKBONES.build("xlstm", img_size=224)
    assert (tiny.embed_dim, tiny.depth) == (192, 24)
    assert 5.5e6 < sum(p.numel() for p in tiny.parameters()) < 6.5e6  # ViL-T: 6M
    cell = tiny.blocks[0].layer.mlstm_cell
    assert cell.num_heads == 4 and cell.igate.out_features == 4 and cell.igate.in_features == 3 * 384
    torch.testing.assert_close(cell.fgate.bias.detach(), torch.linspace(3.0, 6.0, 4))
    assert cell.fgate.weight.abs().sum() == 0 and cell.igate.weight.abs().sum() == 0
    assert 0 < cell.igate.bias.std() < 0.5
    layer = tiny.blocks[0].layer
    assert layer.q_proj.weight.shape == (96, 4, 4)  # block-diagonal 4x4
    assert tuple(layer.conv.conv.weight.shape) == (384, 1, 3, 3)
    assert torch.equal(layer.learnable_skip.detach(), torch.ones(384))
    assert abs(layer.proj_up.weight.std().item() - math.sqrt(2 / (5 * 192))) < 0.005
    assert abs(layer.proj_down.weight.std().item() - 2 / math.sqrt(192)) < 0.01
    v1 = build(3, version="v1")
    assert v1.blocks[0].layer.proj_up.bias is None and v1.blocks[0].norm.bias is None
    assert tuple(v1.blocks[0].layer.conv.conv.weight.shape) == (64, 1, 4)
    assert tuple(build(3).blocks[0].layer.conv.conv.weight.shape) == (64, 1, 3, 3, 3)
    assert BACKBONES.build("xlstm", size="small", img_size=32).embed_dim == 384
    with pytest.raises(ValueError, match="unknown xLSTM size"):
        BACKBONES.build("xlstm", size="huge")


def test_config_builds() -> None:
    cfg = OmegaConf.create(
        {
            "data": {"spatial_dims": 3, "num_channels": 2, "crop_size": [32, 32, 32], "patch_size": 8},
            "backbone": OmegaConf.load(REPO / "conf" / "backbone" / "xlstm.yaml"),
        }
    )
    kwargs = OmegaConf.to_container(cfg.backbone, resolve=True)
    name = kwargs.pop("name")  # type: ignore[union-attr]
    model = BACKBONES.build(name, **kwargs)  # type: ignore[arg-type]
    assert model.spatial_dims == 3 and model.embed_dim == 192 and model.in_chans == 2


def test_autocast_bf16_runs() -> None:
    model = build()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randn(2, 1, 16, 16))
    assert torch.isfinite(out.pooled.float()).all()


def test_learns_on_demo_crops(demo_store_2d: str) -> None:
    """A few dozen steps of masked-patch regression on real 2D demo crops: the loss falls."""
    from ssl_med.data.crops import RandomCropDataset
    from ssl_med.layers.patch_embed import patchify

    ds = RandomCropDataset(demo_store_2d, (32, 32), num_channels=1, length=256, seed=0)
    images = torch.stack([ds[i]["image"] for i in range(64)])  # (64, 1, 32, 32) in [0, 1]
    torch.manual_seed(0)
    model = BACKBONES.build(
        "xlstm", spatial_dims=2, in_chans=1, img_size=32, patch_size=8, embed_dim=64, depth=2
    )
    head = torch.nn.Linear(64, 64)
    opt = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=2e-3)
    losses = []
    for step in range(30):
        batch = images[(step * 16) % 64 : (step * 16) % 64 + 16]
        mask = torch.rand(16, 16) < 0.5
        target = patchify(batch, (8, 8))  # (B, 16, 64)
        pred = head(model(batch, mask=mask).patch_tokens)
        loss = F.mse_loss(pred[mask], target[mask])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, losses
