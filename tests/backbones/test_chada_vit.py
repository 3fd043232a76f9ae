"""ChAda-ViT: channel-permutation invariance, missing channels, mixed channel counts, packing, BraTS."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from backbones.chada_vit import ChAdaViT, collate_channels
from ssl_med.encoder import EncoderOutput

VOCAB = ["dapi", "actin", "tubulin", "mito", "er", "golgi"]
TOL = {"atol": 2e-5, "rtol": 1e-4}


def make(spatial_dims: int = 2, **kw: object) -> ChAdaViT:
    torch.manual_seed(0)
    kw = {
        "img_size": 16,
        "patch_size": 4,
        "embed_dim": 32,
        "depth": 2,
        "num_heads": 2,
        "channel_vocab": VOCAB,
        **kw,
    }
    return ChAdaViT(spatial_dims=spatial_dims, **kw).eval()


def assert_same(a: EncoderOutput, b: EncoderOutput) -> None:
    torch.testing.assert_close(a.pooled, b.pooled, **TOL)
    torch.testing.assert_close(a.patch_tokens, b.patch_tokens, **TOL)
    for ha, hb in zip(a.hidden_states, b.hidden_states, strict=True):
        torch.testing.assert_close(ha, hb, **TOL)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_channel_permutation_with_names_is_invariant(spatial_dims: int) -> None:
    enc = make(spatial_dims)
    torch.manual_seed(1)
    x = torch.randn(2, 4, *([16] * spatial_dims))
    names = [["dapi", "actin", "mito", "er"], ["golgi", "tubulin", "dapi", "actin"]]
    perm = [2, 0, 3, 1]
    with torch.no_grad():
        a = enc(x, channel_names=names, return_layers=(0, 1))
        b = enc(x[:, perm], channel_names=[[n[i] for i in perm] for n in names], return_layers=(0, 1))
        c = enc(x[:, perm], channel_names=names, return_layers=(0, 1))  # names not permuted
    assert_same(a, b)
    assert not torch.allclose(a.pooled, c.pooled, atol=1e-4)


def test_unnamed_channels_use_slot_embedding() -> None:
    enc = make()
    x = torch.randn(1, 3, 16, 16)
    with torch.no_grad():
        slot = enc(x)
        named = enc(x, channel_names=[["dapi", "actin", "mito"]])
        swapped = enc(x[:, [1, 0, 2]])
    assert not torch.allclose(slot.pooled, named.pooled, atol=1e-4)
    assert not torch.allclose(slot.pooled, swapped.pooled, atol=1e-4)  # slots carry order


@pytest.mark.parametrize("packing", ["pad", "pack"])
def test_missing_channel_equals_removed_channel(packing: str) -> None:
    """An image with a missing slot (garbage content) == the same image without that channel."""
    enc = make(packing=packing)
    torch.manual_seed(2)
    x = torch.randn(1, 3, 16, 16)
    names = ["dapi", "actin", "mito"]
    garbage = torch.randn(1, 1, 16, 16) * 100
    padded = torch.cat([x[:, :1], garbage, x[:, 1:]], dim=1)
    with torch.no_grad():
        ref = enc(x, channel_names=[names], return_layers=(0,))
        by_name = enc(padded, channel_names=[["dapi", None, "actin", "mito"]], return_layers=(0,))
        by_mask = enc(
            padded,
            channel_names=[["dapi", "er", "actin", "mito"]],
            channel_padding_mask=torch.tensor([[False, True, False, False]]),
            return_layers=(0,),
        )
    assert_same(ref, by_name)
    assert_same(ref, by_mask)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_mixed_channel_counts_in_one_batch(spatial_dims: int) -> None:
    """1-, 3- and 5-channel images batched together: each output equals the image run alone."""
    enc = make(spatial_dims, img_size=8)
    torch.manual_seed(3)
    shape = [8] * spatial_dims
    images = [torch.randn(1, *shape), torch.randn(3, *shape), torch.randn(5, *shape)]
    names = [["er"], ["dapi", "golgi", "actin"], ["mito", "tubulin", "dapi", "er", "actin"]]
    x, channel_names, padding = collate_channels(images, names)
    assert x.shape == (3, 5, *shape) and padding.sum(1).tolist() == [4, 2, 0]
    with torch.no_grad():
        batched = enc(x, channel_names=channel_names, return_layers=(-1,))
        alone = [enc(im[None], channel_names=[nm], return_layers=(-1,)) for im, nm in zip(images, names)]
        # unnamed images: padding from the mask, slot embeddings
        unnamed = enc(x, channel_padding_mask=padding)
        unnamed_alone = enc(images[1][None])
    n = 2**spatial_dims
    assert batched.pooled.shape == (3, 32) and batched.patch_tokens.shape == (3, n, 32)
    for i, single in enumerate(alone):
        torch.testing.assert_close(batched.pooled[i], single.pooled[0], **TOL)
        torch.testing.assert_close(batched.patch_tokens[i], single.patch_tokens[0], **TOL)
        torch.testing.assert_close(batched.hidden_states[0][i], single.hidden_states[0][0], **TOL)
    torch.testing.assert_close(unnamed.pooled[1], unnamed_alone.pooled[0], **TOL)


def test_packing_equals_padding_forward_and_backward() -> None:
    torch.manual_seed(4)
    images = [torch.randn(2, 16, 16), torch.randn(4, 16, 16), torch.randn(1, 16, 16)]
    x, _, padding = collate_channels(images)
    outs, grads = [], []
    for packing in ("pad", "pack"):
        enc = make(packing=packing)
        out = enc(x, channel_padding_mask=padding, return_layers=(0,))
        (out.pooled.square().sum() + out.patch_tokens.square().sum()).backward()
        outs.append(out)
        grads.append(torch.cat([p.grad.flatten() for p in enc.parameters() if p.grad is not None]))
    assert_same(outs[0], outs[1])
    torch.testing.assert_close(grads[0], grads[1], atol=1e-4, rtol=1e-3)


def test_spatial_mask_and_keep_idx_cover_all_channels() -> None:
    enc = make()
    with torch.no_grad():
        enc.mask_token.normal_()
    torch.manual_seed(5)
    x = torch.randn(2, 3, 16, 16)
    names = [["dapi", "actin", "mito"], ["er", None, "golgi"]]
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[:, 0] = True  # patch 0 = pixels [0:4, 0:4]
    x2 = x.clone()
    x2[:, :, :4, :4] = torch.randn(2, 3, 4, 4)  # change patch 0 in every channel
    keep = torch.tensor([[1, 5, 9, 15], [2, 3, 4, 6]])
    with torch.no_grad():
        assert_same(enc(x, mask=mask, channel_names=names), enc(x2, mask=mask, channel_names=names))
        assert not torch.allclose(enc(x, channel_names=names).pooled, enc(x2, channel_names=names).pooled)
        a = enc(x, keep_idx=keep, channel_names=names)
        b = enc(x2, keep_idx=keep, channel_names=names)  # patch 0 dropped in all channels
    assert a.patch_tokens.shape == (2, 4, 32)
    assert_same(a, b)


def test_slots_missing_everywhere_are_dropped() -> None:
    enc = make()
    x = torch.randn(2, 4, 16, 16)
    names = [["dapi", None, "actin"], ["er", None]]  # slot 1 and 3 never used, slot 2 only by image 0
    with torch.no_grad():
        a = enc(x, channel_names=names)
        b = enc(x[:, [0, 2]], channel_names=[["dapi", "actin"], ["er", None]])
    assert_same(a, b)


def test_channel_errors() -> None:
    enc = make(max_channels=3)
    x = torch.randn(2, 2, 16, 16)
    with pytest.raises(ValueError, match="unknown channel name"):
        enc(x, channel_names=[["dapi", "cy5"], ["dapi", "er"]])
    with pytest.raises(ValueError, match="no channel left"):
        enc(x, channel_names=[["dapi", "er"], [None, ""]])
    with pytest.raises(ValueError, match="entries for a batch"):
        enc(x, channel_names=[["dapi", "er"]])
    with pytest.raises(ValueError, match="max_channels"):
        enc(torch.randn(1, 4, 16, 16))
    with pytest.raises(ValueError, match="bool tensor"):
        enc(x, channel_padding_mask=torch.zeros(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="channel-adaptive"):
        ChAdaViT(in_chans=3)


def test_names_are_case_insensitive_and_collate_checks() -> None:
    enc = make()
    x = torch.randn(1, 2, 16, 16)
    with torch.no_grad():
        assert_same(enc(x, channel_names=[["DAPI", " Actin"]]), enc(x, channel_names=[["dapi", "actin"]]))
    with pytest.raises(ValueError, match="channel names"):
        collate_channels([torch.randn(2, 4, 4)], [["dapi"]])


def test_init_from_vit_weights(tmp_path: Path) -> None:
    from backbones.vit import VisionTransformer

    vit = VisionTransformer(
        spatial_dims=2, in_chans=3, img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2
    )
    path = tmp_path / "vit.pth"
    torch.save(vit.state_dict(), path)
    enc = make(init_from=str(path))
    torch.testing.assert_close(enc.patch_embed.proj.weight, vit.patch_embed.proj.weight.sum(1, keepdim=True))
    torch.testing.assert_close(enc.blocks[1].mlp.fc2.weight, vit.blocks[1].mlp.fc2.weight)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_single_channel_equals_vit_with_same_weights(spatial_dims: int) -> None:
    """One channel, zero channel embedding: exactly a 1-channel ViT (outputs and gradients) on what DINO
    uses: CLS pooling, an iBOT mask and a smaller (local-crop) grid with resampled positions."""
    from backbones.vit import VisionTransformer

    kw = {"img_size": 16, "patch_size": 4, "embed_dim": 24, "depth": 2, "num_heads": 2}
    torch.manual_seed(0)
    vit = VisionTransformer(spatial_dims=spatial_dims, in_chans=1, **kw)
    enc = ChAdaViT(spatial_dims=spatial_dims, **kw)
    missing, unexpected = enc.load_state_dict(vit.state_dict(), strict=False)
    assert missing == ["channel_pos_embed"] and not unexpected
    with torch.no_grad():
        enc.channel_pos_embed.zero_()
        for model in (vit, enc):
            model.mask_token.normal_(generator=torch.Generator().manual_seed(1))
    n = 4**spatial_dims
    mask = torch.rand(3, n, generator=torch.Generator().manual_seed(2)) < 0.4
    for size, m in ((16, None), (16, mask), (8, None)):
        x = torch.rand(3, 1, *(size,) * spatial_dims)
        outs = []
        for model in (vit, enc):
            model.zero_grad()
            out = model(x, mask=m)
            (out.pooled.square().sum() + out.patch_tokens.sum()).backward()
            outs.append(out)
        torch.testing.assert_close(outs[1].pooled, outs[0].pooled)
        torch.testing.assert_close(outs[1].patch_tokens, outs[0].patch_tokens)
        grads = dict(vit.named_parameters())
        for name, p in enc.named_parameters():
            if name != "channel_pos_embed" and p.grad is not None:
                torch.testing.assert_close(p.grad, grads[name].grad, msg=name)


@pytest.mark.shared_data
def test_brats_sequences_permutation_and_missing(shared_data: Path) -> None:
    """Real 4-sequence MRI (BraTS 2020 case 001): permutation invariance and a missing sequence."""
    nib = pytest.importorskip("nibabel")
    case = shared_data / "brats2020_sample" / "BraTS20_Training_001"
    if not case.is_dir():
        pytest.skip(f"{case} not found")
    seqs = ["t1", "t1ce", "t2", "flair"]
    vols = []
    for s in seqs:
        img = nib.load(str(case / f"BraTS20_Training_001_{s}.nii.gz"))
        crop = torch.from_numpy(img.dataobj[104:136, 104:136, 62:94].astype("float32"))  # 32^3 at the centre
        vols.append((crop - crop.mean()) / (crop.std() + 1e-6))
    x = torch.stack(vols).permute(0, 3, 1, 2)[None]  # (1, 4, D, H, W)
    assert x.shape == (1, 4, 32, 32, 32) and x.abs().sum() > 0
    enc = make(3, img_size=32, patch_size=8, channel_vocab=seqs)
    perm = [3, 1, 0, 2]
    with torch.no_grad():
        a = enc(x, channel_names=[seqs])
        b = enc(x[:, perm], channel_names=[[seqs[i] for i in perm]])
        no_t1ce = enc(x, channel_names=[["t1", None, "t2", "flair"]])
        removed = enc(x[:, [0, 2, 3]], channel_names=[["t1", "t2", "flair"]])
    assert a.patch_tokens.shape == (1, 64, 32)
    assert_same(a, b)
    assert_same(no_t1ce, removed)
    assert not torch.allclose(a.pooled, no_t1ce.pooled, atol=1e-4)
