"""Vision Mamba backbone: scan orders, middle CLS, visible-only forward, Vim v2 mixer, init, learning."""

from __future__ import annotations

import itertools
from collections import Counter

import pytest
import torch
import torch.nn.functional as F

from backbones.mamba import MultiScanMamba, VisionMamba, scan_branches
from ssl_med.encoder import TokenLayout
from ssl_med.ops.scan_order import grid_rank, invert, is_sequence_order, parse_order, sequence_order
from ssl_med.registry import BACKBONES


def tiny(spatial_dims: int = 2, **kw) -> VisionMamba:
    torch.manual_seed(0)
    kw = {"embed_dim": 32, "depth": 2, "patch_size": 4, "img_size": 16, "in_chans": 1, **kw}
    return BACKBONES.build("mamba", spatial_dims=spatial_dims, **kw).eval()


def all_orders(spatial_dims: int) -> list[str]:
    axes = "hw" if spatial_dims == 2 else "dhw"
    return ["".join(p) + rev for p in itertools.permutations(axes) for rev in ("", "_rev")]


# -- scan orders --------------------------------------------------------------------------------
@pytest.mark.parametrize(("grid", "prefix"), [((3, 5), ()), ((3, 5), (7,)), ((2, 3, 4), ()), ((2, 3, 4), (12,))])
def test_every_order_is_a_permutation_and_inverts(grid: tuple[int, ...], prefix: tuple[int, ...]) -> None:
    n = torch.Size(grid).numel()
    layout = TokenLayout(grid=grid, keep_idx=None, prefix_positions=prefix)
    seq = torch.randn(2, n + len(prefix), 3)
    for order in all_orders(len(grid)):
        perm = sequence_order(order, layout, 2, torch.device("cpu"))
        assert perm.shape == (2, n + len(prefix))
        assert torch.equal(perm.sort(dim=1).values[0], torch.arange(n + len(prefix)))
        scanned = torch.gather(seq, 1, perm[..., None].expand(-1, -1, 3))
        restored = torch.gather(scanned, 1, invert(perm)[..., None].expand(-1, -1, 3))
        assert torch.equal(restored, seq)


def test_orders_match_their_definitions() -> None:
    grid = (2, 3, 4)
    layout = TokenLayout(grid=grid, keep_idx=None, prefix_positions=())
    ids = torch.arange(24)
    seq = lambda o: sequence_order(o, layout, 1, torch.device("cpu"))[0]  # noqa: E731
    assert torch.equal(seq("dhw"), ids)
    assert torch.equal(seq("dhw_rev"), ids.flip(0))
    # SegMamba's inter-slice scan: stack(chunk(nslices=D)).flatten -> depth fastest
    segmamba = torch.stack(ids.chunk(2), dim=-1).flatten()
    assert torch.equal(seq("hwd"), segmamba)
    # column-major 2D scan
    grid2 = TokenLayout(grid=(3, 5), keep_idx=None, prefix_positions=())
    colmajor = torch.arange(15).reshape(3, 5).t().reshape(-1)
    assert torch.equal(sequence_order("wh", grid2, 1, torch.device("cpu"))[0], colmajor)
    # Vim: the middle CLS keeps its index in the forward scan; the reverse scan flips everything
    vim = TokenLayout(grid=(3, 5), keep_idx=None, prefix_positions=(7,))
    assert torch.equal(sequence_order("hw", vim, 1, torch.device("cpu"))[0], torch.arange(16))
    assert torch.equal(sequence_order("hw_rev", vim, 1, torch.device("cpu"))[0], torch.arange(16).flip(0))


@pytest.mark.parametrize(("grid", "prefix"), [((3, 5), ()), ((3, 5), (7,)), ((2, 3, 4), (12,))])
def test_orders_marked_as_the_sequences_own_are_the_identity(grid: tuple[int, ...], prefix: tuple[int, ...]) -> None:
    """The mixer skips the reordering for these orders, so they must be exactly ``arange(L)``."""
    n = torch.Size(grid).numel() + len(prefix)
    layout = TokenLayout(grid=grid, keep_idx=None, prefix_positions=prefix)
    marked = [o for o in all_orders(len(grid)) if is_sequence_order(o, layout)]
    assert marked == ["hw" if len(grid) == 2 else "dhw"]
    assert torch.equal(sequence_order(marked[0], layout, 2, torch.device("cpu")), torch.arange(n).expand(2, -1))
    kept = TokenLayout(grid=grid, keep_idx=torch.arange(4).expand(2, -1), prefix_positions=())
    assert not any(is_sequence_order(o, kept) for o in all_orders(len(grid)))


def test_bad_orders_are_rejected() -> None:
    with pytest.raises(ValueError, match="scan order"):
        parse_order("hh", 2)
    with pytest.raises(ValueError, match="scan order"):
        tiny(3, scan_orders=("hw",))


def test_kept_tokens_are_visited_in_the_full_orders_relative_order() -> None:
    grid = (2, 3, 4)
    keep = torch.stack([torch.randperm(24)[:10] for _ in range(2)])  # unsorted on purpose
    layout = TokenLayout(grid=grid, keep_idx=keep, prefix_positions=(5,))
    for order in all_orders(3):
        axes, rev = parse_order(order, 3)
        perm = sequence_order(order, layout, 2, torch.device("cpu"))
        for b in range(2):
            patch_seq = [int(p) for p in perm[b] if p != 5]
            visited = [int(keep[b, p if p < 5 else p - 1]) for p in patch_seq]  # grid ids in scan order
            rank = grid_rank(grid, axes)
            expected = sorted(visited, key=lambda i: int(rank[i]), reverse=rev)
            assert visited == expected
            assert int(perm[b, (10 - 5) if rev else 5]) == 5  # the CLS sits at the same scan step


# -- the encoder --------------------------------------------------------------------------------
def test_middle_cls_token_and_causal_forward_scan() -> None:
    enc = tiny(scan_orders=("hw",))
    x = torch.randn(1, 1, 16, 16)
    with torch.no_grad():
        out = enc(x)
        enc.cls_token.add_(1.0)
        moved = enc(x)
    n = 16
    assert out.prefix_tokens.shape == (1, 1, 32)
    torch.testing.assert_close(out.pooled, out.prefix_tokens[:, 0])
    delta = (moved.patch_tokens - out.patch_tokens).abs().amax(-1)[0]
    assert torch.all(delta[: n // 2] == 0)  # patches scanned before the middle CLS do not see it
    assert torch.all(delta[n // 2 :] > 0)


def test_bidirectional_scan_sees_both_sides() -> None:
    enc = tiny()
    x = torch.randn(1, 1, 16, 16)
    x2 = x.clone()
    x2[..., 8:12, 8:12] += 3.0  # patch (2, 2) = token 10
    with torch.no_grad():
        delta = (enc(x2).patch_tokens - enc(x).patch_tokens).abs().amax(-1)[0]
    assert delta[0] > 0 and delta[15] > 0


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_keep_all_in_any_order_equals_full_forward(spatial_dims: int) -> None:
    enc = tiny(spatial_dims)
    x = torch.randn(2, 1, *([16] * spatial_dims))
    n = 4**spatial_dims
    keep = torch.stack([torch.randperm(n) for _ in range(2)])
    with torch.no_grad():
        full, kept = enc(x), enc(x, keep_idx=keep)
    expected = torch.gather(full.patch_tokens, 1, keep[..., None].expand(-1, -1, 32))
    torch.testing.assert_close(kept.patch_tokens, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(kept.pooled, full.pooled, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_visible_only_forward_ignores_dropped_patches_and_keep_order(spatial_dims: int) -> None:
    enc = tiny(spatial_dims)
    n = 4**spatial_dims
    x = torch.randn(2, 1, *([16] * spatial_dims))
    keep = torch.stack([torch.randperm(n)[: n // 4].sort().values for _ in range(2)])
    shuffled = torch.stack([k[torch.randperm(len(k))] for k in keep])
    dropped = torch.ones(2, n, dtype=torch.bool).scatter_(1, keep, False)
    noise = F.interpolate(dropped.float().reshape(2, 1, *([4] * spatial_dims)), scale_factor=4)
    with torch.no_grad():
        a = enc(x, keep_idx=keep)
        b = enc(x + 5 * noise * torch.randn_like(x), keep_idx=keep)
        c = enc(x, keep_idx=shuffled)
    torch.testing.assert_close(a.patch_tokens, b.patch_tokens)
    # the scans visit kept tokens by grid position, so keep_idx order only permutes the outputs
    pos = torch.searchsorted(keep, shuffled)  # where each shuffled id sits in the sorted run
    torch.testing.assert_close(c.patch_tokens, a.patch_tokens.gather(1, pos[..., None].expand(-1, -1, 32)))


def test_bimamba_v2_equals_hand_composed_directions() -> None:
    """Vim v2: out_proj((y_fwd + flip(y_bwd(flip(xz)))) / 2) with shared in_proj / out_proj."""
    torch.manual_seed(0)
    mixer = MultiScanMamba(16, num_orders=2).double()
    h = torch.randn(2, 9, 16, dtype=torch.float64)
    ident = torch.arange(9).expand(2, -1)
    got = mixer(h, [ident, ident.flip(1)])
    xz = mixer.in_proj(h).transpose(1, 2)
    x, z = xz.chunk(2, dim=1)
    fwd = mixer.branches[0](x, z)
    bwd = mixer.branches[1](x.flip(-1), z.flip(-1)).flip(-1)
    torch.testing.assert_close(got, mixer.out_proj(((fwd + bwd) / 2).transpose(1, 2)))


@pytest.mark.parametrize("impl", ["fused", "ref"])
def test_batched_orders_equal_one_branch_at_a_time(impl: str) -> None:
    """K branches in one conv / projection / scan call equal each branch on its own, written with plain
    ops (padded conv1d, linears, the selective scan per branch; A, D and the dt bias in float32 as
    mamba-ssm passes them), outputs and every gradient."""
    from ssl_med.ops import selective_scan_fused
    from ssl_med.ops.selective_scan import selective_scan

    if impl == "fused" and not selective_scan_fused.fused_available():
        pytest.skip(f"fused CPU kernel unavailable: {selective_scan_fused.fused_status()}")
    torch.manual_seed(0)
    mixer = MultiScanMamba(16, num_orders=3, scan_impl=impl).double()
    for branch in mixer.branches:  # distinct parameters per branch
        with torch.no_grad():
            for p in branch.parameters():
                p.add_(0.1 * torch.randn_like(p))
    e = 32
    x = torch.randn(2, 7, 3 * e, dtype=torch.float64).transpose(1, 2).requires_grad_()  # token-major
    z = torch.randn(2, 3 * e, 7, dtype=torch.float64, requires_grad=True)
    batched = scan_branches(mixer.branches, x, z)  # (B, L, K E)

    def one(branch, xb: torch.Tensor, zb: torch.Tensor) -> torch.Tensor:
        w = branch.conv1d.weight
        xc = F.silu(F.conv1d(F.pad(xb, (w.shape[-1] - 1, 0)), w, branch.conv1d.bias, groups=e))
        dt, b, c = branch.x_proj(xc.transpose(1, 2)).split([branch.dt_rank, 16, 16], dim=-1)
        delta = (dt @ branch.dt_proj.weight.T).transpose(1, 2)
        return selective_scan(
            xc, delta, -torch.exp(branch.A_log.float()), b.transpose(1, 2), c.transpose(1, 2),
            D=branch.D.float(), z=zb, delta_bias=branch.dt_proj.bias.float(), delta_softplus=True, impl="ref",
        ).transpose(1, 2)  # fmt: skip

    plain = torch.cat(
        [one(br, x[:, k * e : (k + 1) * e], z[:, k * e : (k + 1) * e]) for k, br in enumerate(mixer.branches)], -1
    )
    torch.testing.assert_close(batched, plain, rtol=1e-10, atol=1e-10)
    leaves = [x, z, *mixer.branches.parameters()]
    grad = torch.randn_like(plain)
    for a, b in zip(torch.autograd.grad(batched, leaves, grad), torch.autograd.grad(plain, leaves, grad), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_identity_order_given_as_none_equals_the_explicit_permutation() -> None:
    torch.manual_seed(0)
    mixer = MultiScanMamba(16, num_orders=2).double()
    h = torch.randn(2, 9, 16, dtype=torch.float64, requires_grad=True)
    ident = torch.arange(9).expand(2, -1)
    perm = torch.stack([torch.randperm(9) for _ in range(2)])
    explicit = mixer(h, [ident, perm])
    skipped = mixer(h, [None, perm], [None, invert(perm)])
    torch.testing.assert_close(skipped, explicit, rtol=0, atol=0)
    grads = [torch.autograd.grad(out.square().sum(), h)[0] for out in (explicit, skipped)]
    torch.testing.assert_close(grads[1], grads[0])


def _graph_nodes(t: torch.Tensor) -> Counter[str]:
    """How many autograd nodes of each type are behind ``t``."""
    seen, stack, names = set(), [t.grad_fn], Counter()
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        names[type(fn).__name__] += 1
        stack.extend(f for f, _ in fn.next_functions)
    return names


@pytest.mark.parametrize(("spatial_dims", "size"), [(2, 16), (2, 32), (3, 16)])
def test_training_graph_takes_the_fused_cpu_paths(spatial_dims: int, size: int) -> None:
    """DINO's / VoCo's crops (2x2 tokens + CLS for a 16x16 local crop at patch 8, 4x4 for a global
    one, 2x2x2 for a 16^3 crop): the branch conv and the scan run in the fused C++ kernels and tokens
    are reordered by permutation (no oneDNN grouped conv, no scatter-add in the backward)."""
    from ssl_med.ops import selective_scan_fused

    if not selective_scan_fused.fused_available():
        pytest.skip(f"fused CPU kernel unavailable: {selective_scan_fused.fused_status()}")
    enc = tiny(spatial_dims, patch_size=8, img_size=32).train()
    out = enc(torch.randn(3, 1, *([size] * spatial_dims)))
    nodes = _graph_nodes(out.pooled)
    # the orders of a block run as one conv and one scan; tokens spread into and merged out of them
    assert nodes["_FusedScanBackward"] == nodes["_FusedConvBackward"] == enc.depth
    assert nodes["_SelectSumBackward"] == 2 * enc.depth
    assert nodes["ConvolutionBackward0"] == 1  # the patch embedding only
    assert not {"IndexBackward0", "GatherBackward0", "_ConvSiluBackward"} & set(nodes)
    out.pooled.square().sum().backward()
    assert all(p.grad is not None for n, p in enc.named_parameters() if "mask_token" not in n)


def test_reference_init_and_sizes() -> None:
    enc = BACKBONES.build("mamba", spatial_dims=2, in_chans=1, img_size=32, patch_size=16, depth=1, size="small")
    assert enc.embed_dim == 384
    branch = enc.blocks[0].mixer.branches[1]
    assert branch.dt_rank == 24 and branch.x_proj.out_features == 24 + 32
    dt = F.softplus(branch.dt_proj.bias)
    assert dt.min() >= 1e-4 and dt.max() <= 0.1 + 1e-6
    torch.testing.assert_close(-torch.exp(branch.A_log), -torch.arange(1, 17.0).repeat(768, 1))
    assert torch.all(branch.D == 1)
    assert "blocks.0.mixer.branches.0.A_log" in enc.no_weight_decay()
    assert isinstance(enc.norm, torch.nn.RMSNorm)
    full = BACKBONES.build("mamba", spatial_dims=2, in_chans=3, img_size=224, patch_size=16)
    assert (full.embed_dim, full.depth) == (192, 24)
    assert 6.5e6 < sum(p.numel() for p in full.parameters()) < 7.5e6  # Vim-Ti: 7M


def test_residual_stream_in_float32_under_autocast() -> None:
    enc = tiny()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out = enc(torch.randn(1, 1, 16, 16), return_layers=(0,))
    assert out.hidden_states[0].dtype == torch.float32


def test_it_learns_on_real_crops(demo_store_2d: str) -> None:
    """Tiny Mamba + linear pixel head reconstructs real 32x32 crops; the loss falls."""
    from ssl_med.data.crops import RandomCropDataset

    ds = RandomCropDataset(demo_store_2d, (32, 32), num_channels=1, length=64, seed=0)
    images = torch.stack([ds[i]["image"] for i in range(64)])
    torch.manual_seed(0)
    enc = BACKBONES.build("mamba", spatial_dims=2, in_chans=1, img_size=32, patch_size=8, embed_dim=32, depth=2)
    head = torch.nn.Linear(32, 64)
    opt = torch.optim.AdamW([*enc.parameters(), *head.parameters()], lr=3e-3)
    target = images.unfold(2, 8, 8).unfold(3, 8, 8).reshape(64, 1, 16, 64)[:, 0]  # (B, N, p*p) raster
    losses = []
    for step in range(30):
        idx = torch.arange(16) + 16 * (step % 4)
        pred = head(enc(images[idx]).patch_tokens)
        loss = F.mse_loss(pred, target[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-4:]) / 4 < 0.5 * sum(losses[:4]) / 4
