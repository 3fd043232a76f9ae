"""timm loads every export with ``import timm`` only (the installed ``ssl_med-timm.pth``), behind timm's API."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from ssl_med.export import save_encoder
from ssl_med.feature_model import FeatureModel
from ssl_med.registry import BACKBONES
from ssl_med.timm_plugin import BUILTIN_BACKBONES

ROOT = Path(__file__).resolve().parents[2]
PTH = ROOT / "ssl_med-timm.pth"
TINY = {"embed_dim": 48, "depth": 2, "patch_size": 4, "img_size": 8}


def _export(folder: Path, name: str, spatial_dims: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A tiny export of ``name``; returns an input and ssl_med's pooled features for it."""
    torch.manual_seed(0)
    backbone = {"name": name, "spatial_dims": spatial_dims, **TINY}
    if inspect.signature(BACKBONES.get(name)).parameters["in_chans"].default is not None:
        backbone["in_chans"] = 1  # channel-adaptive backbones (ChAda-ViT) take any channels
    encoder = BACKBONES.build(name, **{k: v for k, v in backbone.items() if k != "name"}).eval()
    save_encoder(encoder, folder, {"backbone": backbone, "objective": {"name": "mae"}, "data": {"name": "demo"}})
    x = torch.rand(2, 1, *([8] * spatial_dims), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return x, encoder(x).pooled


def _fresh_python(code: str, site_dir: Path) -> subprocess.CompletedProcess:
    """Run ``code`` in a new interpreter whose start-up processes the repository's ``ssl_med-timm.pth``
    as ``site-packages`` does after ``pip install ssl_med`` (``site.addsitedir`` is what start-up calls)."""
    (site_dir / PTH.name).write_text(PTH.read_text())
    boot = f"import site; site.addsitedir({str(site_dir)!r})\n"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("SSL_MED_TIMM_PLUGIN", None)
    return subprocess.run([sys.executable, "-c", boot + textwrap.dedent(code)], capture_output=True, text=True, env=env, timeout=300)


def test_builtin_backbone_list_matches_the_registry() -> None:
    assert set(BUILTIN_BACKBONES) <= set(BACKBONES.names())
    builtin = {n for n in BACKBONES.names() if BACKBONES.get(n).__module__.startswith("backbones.")}
    assert builtin == set(BUILTIN_BACKBONES)


def test_timm_alone_loads_3d_vit_and_mamba_exports(tmp_path: Path) -> None:
    """A fresh interpreter that imports only timm (and torch) loads a 3D ViT and a Mamba export, through
    ``local-dir:`` and ``pretrained_cfg_overlay=dict(file=...)``, with ssl_med's pooled features."""
    expected = {}
    for name in ("vit", "mamba"):
        x, pooled = _export(tmp_path / name, name, 3)
        torch.save({"x": x, "pooled": pooled}, tmp_path / f"{name}.pt")
        expected[name] = pooled
    code = f"""
        import sys, torch, timm
        assert "ssl_med" not in sys.modules or "ssl_med.hub" not in sys.modules
        for name in ("vit", "mamba"):
            folder = {str(tmp_path)!r} + "/" + name
            ref = torch.load(folder + ".pt")
            model = timm.create_model("local-dir:" + folder, pretrained=True)
            same = timm.create_model("ssl_med_" + name, pretrained=True, pretrained_cfg_overlay=dict(file=folder),
                                     **__import__("json").load(open(folder + "/config.json"))["model_args"])
            with torch.no_grad():
                tokens = model.forward_features(ref["x"])
                torch.testing.assert_close(model(ref["x"]), ref["pooled"], rtol=0, atol=0)
                torch.testing.assert_close(same(ref["x"]), ref["pooled"], rtol=0, atol=0)
                torch.testing.assert_close(model.forward_head(tokens, pre_logits=True), ref["pooled"], rtol=0, atol=0)
            assert tokens.shape[-1] == model.num_features == 48 and not model.training
            model.reset_classifier(3)
            assert model(ref["x"]).shape == (2, 3) and model.get_classifier().out_features == 3
            print(name, type(model).__name__, tuple(tokens.shape))
    """
    result = _fresh_python(code, tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "vit FeatureModel (2, 9, 48)" in result.stdout  # CLS + 2x2x2 patches
    assert "mamba FeatureModel" in result.stdout


def test_start_up_stays_light_and_can_be_turned_off(tmp_path: Path) -> None:
    code = """
        import sys
        heavy = [m for m in ("torch", "timm", "ssl_med.hub") if m in sys.modules]
        assert not heavy, heavy
        print(any(type(f).__name__ == "TimmImportHook" for f in sys.meta_path))
    """
    assert _fresh_python(code, tmp_path).stdout.strip() == "True"
    off = subprocess.run(
        [sys.executable, "-c", f"import site; site.addsitedir({str(tmp_path)!r}); import timm; print(timm.is_model('ssl_med_vit'))"],
        capture_output=True, text=True, env={**os.environ, "SSL_MED_TIMM_PLUGIN": "0"}, timeout=300,
    )
    assert off.stdout.strip() == "False", off.stderr[-2000:]


@pytest.mark.parametrize("name", sorted(BUILTIN_BACKBONES))
def test_feature_model_follows_timm_api(name: str, tmp_path: Path) -> None:
    """In-process: each backbone's 2D and 3D export through timm gives ssl_med's features behind timm's API."""
    import timm

    for spatial_dims in (2, 3):
        folder = tmp_path / f"{name}{spatial_dims}"
        x, pooled = _export(folder, name, spatial_dims)
        model = timm.create_model(f"local-dir:{folder}", pretrained=True)
        config = json.loads((folder / "config.json").read_text())
        with torch.no_grad():
            if config["architecture"].startswith("ssl_med_"):
                assert isinstance(model, FeatureModel)
                torch.testing.assert_close(model(x), pooled, rtol=0, atol=0)
                assert model.no_weight_decay() and all(n.startswith("encoder.") for n in model.no_weight_decay())
            else:  # 2D ViT: timm's own VisionTransformer
                torch.testing.assert_close(model(x), pooled, rtol=1e-5, atol=1e-5)
        assert model.num_features == 48
