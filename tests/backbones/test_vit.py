"""ViT: timm parity (weights load without renaming), channel adaptation, 2D -> 3D inflation, init_from."""

from __future__ import annotations

from pathlib import Path

import pytest
import timm
import torch
from timm.models.vision_transformer import VisionTransformer as TimmViT

from backbones.vit import (
    VisionTransformer,
    adapt_input_channels,
    checkpoint_filter_fn,
    inflate_patch_embed,
    load_pretrained_weights,
)
from ssl_med.registry import BACKBONES

TOL = {"atol": 2e-5, "rtol": 1e-4}


def _randomise(model: torch.nn.Module, seed: int = 0) -> None:
    """Non-trivial values everywhere (timm inits zeros/ones for biases, norms, tokens)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def timm_small() -> torch.nn.Module:
    torch.manual_seed(0)
    model = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
    _randomise(model)
    return model


def test_timm_vit_small_parity(timm_small: torch.nn.Module) -> None:
    ours = BACKBONES.build(
        "vit", spatial_dims=2, size="small", in_chans=3, img_size=224, patch_size=16
    ).eval()
    missing, unexpected = ours.load_state_dict(timm_small.state_dict(), strict=False)  # no renaming
    assert set(missing) == {"mask_token"} and set(unexpected) == {"head.weight", "head.bias"}
    x = torch.randn(2, 3, 224, 224)
    with torch.no_grad():
        ref = timm_small.forward_features(x)
        out = ours(x)
    torch.testing.assert_close(out.pooled, ref[:, 0], **TOL)
    torch.testing.assert_close(out.patch_tokens, ref[:, 1:], **TOL)
    assert out.grid == (14, 14)


def test_three_to_one_channel_adaptation(timm_small: torch.nn.Module) -> None:
    ours = VisionTransformer(spatial_dims=2, size="small", in_chans=1).eval()
    state = checkpoint_filter_fn(timm_small.state_dict(), ours)
    assert state["patch_embed.proj.weight"].shape == (384, 1, 16, 16)
    ours.load_state_dict(state, strict=False)
    grey = torch.randn(1, 1, 224, 224)
    with torch.no_grad():
        ref = timm_small.forward_features(grey.expand(-1, 3, -1, -1))
        out = ours(grey)
    torch.testing.assert_close(out.pooled, ref[:, 0], **TOL)
    torch.testing.assert_close(out.patch_tokens, ref[:, 1:], **TOL)


def test_adapt_input_channels_rules() -> None:
    w = torch.randn(8, 3, 4, 4)
    assert adapt_input_channels(w, 3) is w
    torch.testing.assert_close(adapt_input_channels(w, 1), w.sum(1, keepdim=True))
    w5 = adapt_input_channels(w, 5)
    assert w5.shape == (8, 5, 4, 4)
    torch.testing.assert_close(w5, torch.cat([w, w[:, :2]], 1) * 3 / 5)  # cyclic repeat, rescaled
    # with a multiple of the source channels a constant image keeps its response
    torch.testing.assert_close(adapt_input_channels(w, 6).sum(1), w.sum(1))
    w3d = torch.randn(8, 2, 2, 4, 4)
    torch.testing.assert_close(adapt_input_channels(w3d, 1), w3d.sum(1, keepdim=True))


def _small_timm(**kw: object) -> TimmViT:
    torch.manual_seed(0)
    model = TimmViT(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, num_classes=0, **kw).eval()
    _randomise(model)
    return model


def _small_ours(**kw: object) -> VisionTransformer:
    kw = {"in_chans": 3, **kw}
    return VisionTransformer(
        spatial_dims=2, img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=3, **kw
    ).eval()


def test_parity_registers_layerscale_no_embed_class() -> None:
    """timm's DINOv2-style layout (no CLS position, registers) converts exactly; LayerScale names match."""
    ref_model = _small_timm(reg_tokens=2, no_embed_class=True, init_values=0.1)
    ours = _small_ours(num_register_tokens=2, init_values=0.1)
    state = checkpoint_filter_fn(ref_model.state_dict(), ours)
    missing, unexpected = ours.load_state_dict(state, strict=False)
    assert set(missing) == {"mask_token"} and not unexpected
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref, out = ref_model.forward_features(x), ours(x)
    torch.testing.assert_close(out.pooled, ref[:, 0], **TOL)
    torch.testing.assert_close(out.prefix_tokens, ref[:, :3], **TOL)
    torch.testing.assert_close(out.patch_tokens, ref[:, 3:], **TOL)


def test_parity_registers_with_embedded_prefix() -> None:
    """timm with position rows for CLS and registers: the register rows fold into reg_token."""
    ref_model = _small_timm(reg_tokens=2, no_embed_class=False)
    ours = _small_ours(num_register_tokens=2)
    ours.load_state_dict(checkpoint_filter_fn(ref_model.state_dict(), ours), strict=False)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x).prefix_tokens, ref_model.forward_features(x)[:, :3], **TOL)


def test_parity_other_input_size() -> None:
    """Other input sizes: ssl_med's position interpolation is timm's bicubic ``resample_abs_pos_embed``
    with ``antialias=False`` (DINOv2's choice; timm's default antialias uses a different cubic kernel)."""
    from timm.layers import resample_abs_pos_embed

    ref_model = _small_timm()
    ours = _small_ours()
    ours.load_state_dict(ref_model.state_dict(), strict=False)
    expect = resample_abs_pos_embed(ref_model.pos_embed, (6, 8), (4, 4), num_prefix_tokens=1, antialias=False)
    torch.testing.assert_close(ours.patch_position_embedding((6, 8)), expect[:, 1:], **TOL)
    x = torch.randn(1, 3, 48, 64)
    with torch.no_grad():
        ref_model.pos_embed = torch.nn.Parameter(expect)  # timm at the new size, with the same table
        ref_model.patch_embed.img_size, ref_model.patch_embed.grid_size = (48, 64), (6, 8)
        ref, out = ref_model.forward_features(x), ours(x)
    assert out.grid == (6, 8)
    torch.testing.assert_close(out.patch_tokens, ref[:, 1:], **TOL)


def test_grid_resample_on_load() -> None:
    src = _small_timm()
    ours = VisionTransformer(
        spatial_dims=2, in_chans=3, img_size=48, patch_size=8, embed_dim=48, depth=2, num_heads=3
    )
    state = checkpoint_filter_fn(src.state_dict(), ours)
    assert state["pos_embed"].shape == (1, 1 + 36, 48)
    torch.testing.assert_close(state["pos_embed"][:, 0], src.pos_embed[:, 0])


def test_inflation_2d_to_3d() -> None:
    """A volume constant in depth gives the 2D patch embedding (+ position) of its slice."""
    torch.manual_seed(0)
    vit2d = VisionTransformer(
        spatial_dims=2, in_chans=1, img_size=32, patch_size=8, embed_dim=48, depth=1
    ).eval()
    _randomise(vit2d)
    vit3d = VisionTransformer(
        spatial_dims=3, in_chans=1, img_size=(16, 32, 32), patch_size=(4, 8, 8), embed_dim=48, depth=1
    ).eval()
    state = checkpoint_filter_fn(vit2d.state_dict(), vit3d)
    missing, unexpected = vit3d.load_state_dict(state, strict=False)
    assert not missing and not unexpected
    w = inflate_patch_embed(vit2d.patch_embed.proj.weight, 4)
    torch.testing.assert_close(vit3d.patch_embed.proj.weight, w)
    slice2d = torch.randn(2, 1, 32, 32)
    volume = slice2d[:, :, None].expand(-1, -1, 16, -1, -1)
    with torch.no_grad():
        tok2d, grid2d = vit2d.patch_embed(slice2d)
        tok3d, grid3d = vit3d.patch_embed(volume)
        tok2d = tok2d + vit2d.patch_position_embedding(grid2d)
        tok3d = tok3d + vit3d.patch_position_embedding(grid3d)
    assert grid3d == (4, 4, 4)
    for d in range(4):  # every depth slice of the token grid equals the 2D tokens
        torch.testing.assert_close(tok3d[:, d * 16 : (d + 1) * 16], tok2d, **TOL)
    torch.testing.assert_close(vit3d.pos_embed[:, 0], vit2d.pos_embed[:, 0])  # CLS position kept


def test_sincos_table_is_kept_on_load() -> None:
    src = _small_timm()
    ours = _small_ours(pos_embed="sincos")
    before = ours.pos_embed.clone()
    state = checkpoint_filter_fn(src.state_dict(), ours)
    assert "pos_embed" not in state
    ours.load_state_dict(state, strict=False)
    torch.testing.assert_close(ours.pos_embed, before)


@pytest.mark.parametrize("fmt", ["pth", "safetensors", "lightning"])
def test_init_from_local_file(tmp_path: Path, fmt: str) -> None:
    src = _small_timm()
    state = {k: v.contiguous() for k, v in src.state_dict().items()}
    if fmt == "safetensors":
        from safetensors.torch import save_file

        path = tmp_path / "w.safetensors"
        save_file(state, str(path))
    elif fmt == "lightning":  # an ssl_med DINO checkpoint: student and teacher; the teacher is read
        path = tmp_path / "last.ckpt"
        nested = {f"objective.encoder.{k}": torch.zeros_like(v) for k, v in state.items()}
        nested |= {f"objective.teacher_encoder.{k}": v for k, v in state.items()}
        torch.save({"state_dict": nested, "epoch": 3}, path)
    else:
        path = tmp_path / "w.pth"
        torch.save({"model": state}, path)
    ours = _small_ours(in_chans=1, init_from=str(path)).eval()
    grey = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(
            ours(grey).pooled, src.forward_features(grey.expand(-1, 3, -1, -1))[:, 0], **TOL
        )


def test_init_from_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        _small_ours(init_from=str(tmp_path / "nope.pth"))
    src = _small_timm()
    path = tmp_path / "w.pth"
    torch.save(src.state_dict(), path)
    wider = VisionTransformer(
        spatial_dims=2, in_chans=3, img_size=32, patch_size=8, embed_dim=96, depth=2, num_heads=3
    )
    with pytest.raises(ValueError, match="cannot convert shapes"):
        load_pretrained_weights(wider, path)


def test_sizes_layer_scale_drop_path_registers() -> None:
    for size, (d, depth, heads) in {"tiny": (192, 12, 3), "base": (768, 12, 12)}.items():
        m = VisionTransformer(size=size, img_size=32)
        assert (m.embed_dim, m.depth, m.num_heads) == (d, depth, heads)
    m = VisionTransformer(
        in_chans=1,
        img_size=32,
        patch_size=(8, 4),
        embed_dim=48,
        depth=3,
        num_heads=3,
        drop_path_rate=0.2,
        init_values=1e-5,
        num_register_tokens=4,
    )
    assert [b.drop_path1.drop_prob for b in m.blocks[1:]] == pytest.approx([0.1, 0.2])
    assert torch.allclose(m.blocks[0].ls1.gamma, torch.full((48,), 1e-5))
    out = m.eval()(torch.randn(2, 1, 32, 32))
    assert out.grid == (4, 8) and out.prefix_tokens.shape == (2, 5, 48)
    m.train()
    torch.manual_seed(0)
    a = m(torch.ones(2, 1, 32, 32)).pooled
    b = m(torch.ones(2, 1, 32, 32)).pooled
    assert not torch.allclose(a, b)  # stochastic depth active in training


# -- DINOv2 layouts (continued pretraining) ---------------------------------------------------------

_DEPTH = 4


def _dinov2_source(**kw: object) -> VisionTransformer:
    """A randomised ssl_med ViT with LayerScale and registers: the reference for the layout tests."""
    torch.manual_seed(0)
    kw = {"init_values": 0.1, "num_register_tokens": 2, **kw}
    model = VisionTransformer(
        spatial_dims=2, in_chans=3, img_size=32, patch_size=8, embed_dim=48, depth=_DEPTH, num_heads=3, **kw
    ).eval()
    _randomise(model)
    return model


def _to_official_dinov2(state: dict[str, torch.Tensor], chunks: int = 0) -> dict[str, torch.Tensor]:
    """ssl_med keys -> facebookresearch/dinov2 keys (``block_chunks=chunks``), written out by hand."""
    out = {}
    for key, value in state.items():
        if key == "reg_token":
            key = "register_tokens"
        elif key == "mask_token":
            value = value.reshape(1, -1)  # DINOv2's mask token is (1, D)
        elif key.startswith("blocks.") and chunks:
            index = int(key.split(".")[1])
            key = f"blocks.{index // (_DEPTH // chunks)}.{key[len('blocks.') :]}"  # blocks.{chunk}.{i}.*
        out[key] = value.clone()
    return out


def _to_hf_dinov2(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """ssl_med keys -> transformers ``Dinov2Model`` keys with q/k/v split, written out by hand."""
    outside = {
        "cls_token": "embeddings.cls_token",
        "reg_token": "embeddings.register_tokens",
        "mask_token": "embeddings.mask_token",
        "pos_embed": "embeddings.position_embeddings",
        "patch_embed.proj.weight": "embeddings.patch_embeddings.projection.weight",
        "patch_embed.proj.bias": "embeddings.patch_embeddings.projection.bias",
        "norm.weight": "layernorm.weight",
        "norm.bias": "layernorm.bias",
    }
    block = {
        "norm1.weight": "norm1.weight",
        "norm1.bias": "norm1.bias",
        "attn.proj.weight": "attention.output.dense.weight",
        "attn.proj.bias": "attention.output.dense.bias",
        "ls1.gamma": "layer_scale1.lambda1",
        "norm2.weight": "norm2.weight",
        "norm2.bias": "norm2.bias",
        "mlp.fc1.weight": "mlp.fc1.weight",
        "mlp.fc1.bias": "mlp.fc1.bias",
        "mlp.fc2.weight": "mlp.fc2.weight",
        "mlp.fc2.bias": "mlp.fc2.bias",
        "ls2.gamma": "layer_scale2.lambda1",
    }
    out = {}
    for key, value in state.items():
        if key in outside:
            out[outside[key]] = value.reshape(1, -1) if key == "mask_token" else value.clone()
            continue
        _, index, rest = key.split(".", 2)
        if rest.startswith("attn.qkv."):
            param = rest.rsplit(".", 1)[1]
            for name, part in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                out[f"encoder.layer.{index}.attention.attention.{name}.{param}"] = part.clone()
        else:
            out[f"encoder.layer.{index}.{block[rest]}"] = value.clone()
    return out


def _assert_same_outputs(loaded: VisionTransformer, source: VisionTransformer) -> None:
    """Identical outputs, with and without masked (mask-token) patches."""
    x = torch.randn(2, 3, 32, 32)
    mask = torch.rand(2, 16) < 0.5
    with torch.no_grad():
        for kw in ({}, {"mask": mask}):
            out, ref = loaded(x, **kw), source(x, **kw)
            for name in ("pooled", "patch_tokens", "prefix_tokens"):
                torch.testing.assert_close(getattr(out, name), getattr(ref, name), rtol=0, atol=0)


@pytest.mark.parametrize("variant", ["flat", "chunked", "reg_free", "training_checkpoint"])
def test_init_from_official_dinov2(tmp_path: Path, variant: str) -> None:
    registers = 0 if variant == "reg_free" else 2
    src = _dinov2_source(num_register_tokens=registers)
    state = _to_official_dinov2(src.state_dict(), chunks=2 if variant == "chunked" else 0)
    assert variant != "chunked" or "blocks.1.3.ls2.gamma" in state
    assert state["mask_token"].shape == (1, 48)
    if variant == "training_checkpoint":  # DINOv2's checkpointer: the teacher is the encoder it releases
        payload: object = {
            "model": {f"student.backbone.{k}": torch.zeros_like(v) for k, v in state.items()}
            | {f"teacher.backbone.{k}": v for k, v in state.items()}
            | {"student.dino_head.mlp.0.weight": torch.zeros(8, 48)},
            "iteration": 10,
        }
    else:
        payload = state
    torch.save(payload, tmp_path / "dinov2_pretrain.pth")
    ours = _dinov2_source(num_register_tokens=registers, init_values=1e-5)
    _randomise(ours, seed=1)  # nothing of the random init may survive
    load_pretrained_weights(ours, tmp_path / "dinov2_pretrain.pth")
    _assert_same_outputs(ours, src)


@pytest.mark.parametrize("prefix", ["", "dinov2."])
def test_init_from_hf_dinov2_layout(tmp_path: Path, prefix: str) -> None:
    from safetensors.torch import save_file

    src = _dinov2_source()
    state = {prefix + k: v.contiguous() for k, v in _to_hf_dinov2(src.state_dict()).items()}
    assert "encoder.layer.3.attention.attention.value.bias" in {k[len(prefix) :] for k in state}
    if prefix:  # Dinov2ForImageClassification: the head sits outside the dinov2. prefix
        state["classifier.weight"] = torch.zeros(2, 96)
    save_file(state, str(tmp_path / "model.safetensors"))
    ours = VisionTransformer(
        spatial_dims=2,
        in_chans=3,
        img_size=32,
        patch_size=8,
        embed_dim=48,
        depth=_DEPTH,
        num_heads=3,
        init_values=1e-5,
        num_register_tokens=2,
        init_from=str(tmp_path),  # folder holding model.safetensors, as RAD-DINO ships
    ).eval()
    _assert_same_outputs(ours, src)


@pytest.mark.parametrize("registers", [0, 2])
def test_init_from_transformers_dinov2(tmp_path: Path, registers: int) -> None:
    """A real transformers ``Dinov2Model`` / ``Dinov2WithRegistersModel`` gives the same tokens."""
    transformers = pytest.importorskip("transformers")
    common = {
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "patch_size": 4,
        "image_size": 16,
        "num_channels": 3,
        "layerscale_value": 0.5,
    }
    if registers:
        config = transformers.Dinov2WithRegistersConfig(num_register_tokens=registers, **common)
        hf = transformers.Dinov2WithRegistersModel(config)
    else:
        hf = transformers.Dinov2Model(transformers.Dinov2Config(**common))
    hf.eval()
    _randomise(hf)
    hf.save_pretrained(tmp_path)
    ours = VisionTransformer(
        spatial_dims=2,
        in_chans=3,
        img_size=16,
        patch_size=4,
        embed_dim=32,
        depth=2,
        num_heads=2,
        init_values=1e-5,
        num_register_tokens=registers,
        init_from=str(tmp_path),
    ).eval()
    x = torch.randn(2, 3, 16, 16)
    mask = torch.rand(2, 16) < 0.5
    with torch.no_grad():
        for hf_kw, kw in (({}, {}), ({"bool_masked_pos": mask}, {"mask": mask})):
            ref = hf(pixel_values=x, **hf_kw).last_hidden_state
            out = ours(x, **kw)
            torch.testing.assert_close(out.pooled, ref[:, 0], **TOL)
            torch.testing.assert_close(out.prefix_tokens, ref[:, : 1 + registers], **TOL)
            torch.testing.assert_close(out.patch_tokens, ref[:, 1 + registers :], **TOL)


def test_init_from_dinov2_errors(tmp_path: Path) -> None:
    state = _to_official_dinov2(_dinov2_source().state_dict())
    torch.save(state, tmp_path / "ls.pth")
    with pytest.raises(ValueError, match=r"set backbone\.init_values"):
        _dinov2_source(init_values=None, init_from=str(tmp_path / "ls.pth"))
    plain = {k: v for k, v in state.items() if ".ls" not in k}  # the reverse: weights without LayerScale
    torch.save(plain, tmp_path / "plain.pth")
    with pytest.raises(ValueError, match=r"init_values=null"):
        _dinov2_source(init_from=str(tmp_path / "plain.pth"))
    torch.save(state | {"blocks.0.mlp.w12.weight": torch.zeros(8, 48)}, tmp_path / "swiglu.pth")
    with pytest.raises(ValueError, match="SwiGLU"):
        _dinov2_source(init_from=str(tmp_path / "swiglu.pth"))
