"""``ssl_med export format=monai_bundle`` writes a bundle that MONAI's own loaders build and run, and the
model card's licence comes from the export, else the data config, else says how to set it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ssl_med.cli import main as cli
from ssl_med.export import save_encoder
from ssl_med.registry import BACKBONES

BACKBONE = {"name": "vit", "spatial_dims": 3, "in_chans": 1, "embed_dim": 48, "depth": 2, "patch_size": 4, "img_size": 8}


@pytest.fixture()
def encoder_folder(tmp_path: Path) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """A tiny 3D ViT export whose data config records a licence; an input and its pooled features."""
    torch.manual_seed(0)
    encoder = BACKBONES.build("vit", **{k: v for k, v in BACKBONE.items() if k != "name"}).eval()
    folder = tmp_path / "encoder"
    data = {"name": "ct-corpus", "license": "cc-by-4.0"}
    save_encoder(encoder, folder, {"backbone": BACKBONE, "objective": {"name": "mae"}, "data": data})
    x = torch.rand(2, 1, 8, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return folder, x, encoder(x).pooled


def test_monai_bundle_loads_and_runs_with_monai(encoder_folder, tmp_path: Path) -> None:
    from monai.bundle import ConfigParser, load

    folder, x, pooled = encoder_folder
    bundle = tmp_path / "bundles" / "ssl_med_vit3d"
    assert cli(["export", f"checkpoint={folder}", f"out={bundle}", "format=monai_bundle"]) == 0
    names = sorted(str(p.relative_to(bundle)) for p in bundle.rglob("*") if p.is_file())
    assert names == ["LICENSE", "configs/inference.json", "configs/metadata.json", "docs/README.md", "models/model.pt"]

    # the one-liner of docs/export.md: MONAI builds network_def from inference.json and loads models/model.pt
    model = load("ssl_med_vit3d", bundle_dir=bundle.parent, workflow_type="inference", device="cpu")
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(x), pooled, rtol=0, atol=0)

    # ConfigParser on inference.json, as `python -m monai.bundle run` reads it
    parser = ConfigParser()
    parser.read_config(bundle / "configs" / "inference.json")
    parser["bundle_root"] = str(bundle)
    parser["device"] = "$torch.device('cpu')"
    network = parser.get_parsed_content("network")
    parser.get_parsed_content("load")
    inferer = parser.get_parsed_content("inferer")
    with torch.no_grad():
        torch.testing.assert_close(inferer(x, network), pooled, rtol=0, atol=0)

    meta = json.loads((bundle / "configs" / "metadata.json").read_text())
    assert meta["license"] == "cc-by-4.0" and "cc-by-4.0" in (bundle / "LICENSE").read_text()
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == 48
    assert meta["network_data_format"]["inputs"]["image"]["spatial_shape"] == [8, 8, 8]
    # a second export into the same bundle folder is allowed (it is an ssl_med bundle)
    assert cli(["export", f"checkpoint={folder}", f"out={bundle}", "format=monai_bundle", "license=apache-2.0"]) == 0
    assert json.loads((bundle / "configs" / "metadata.json").read_text())["license"] == "apache-2.0"


def test_card_license_from_export_then_data_else_how_to_set_it(encoder_folder, tmp_path: Path) -> None:
    folder, _, _ = encoder_folder
    card = (folder / "README.md").read_text()
    assert "license: cc-by-4.0" in card  # the data config's licence
    assert json.loads((folder / "config.json").read_text())["pretrained_cfg"]["license"] == "cc-by-4.0"

    assert cli(["export", f"checkpoint={folder}", f"out={tmp_path / 'a'}", "license=apache-2.0"]) == 0
    assert "license: apache-2.0" in (tmp_path / "a" / "README.md").read_text()

    torch.manual_seed(0)
    encoder = BACKBONES.build("vit", **{k: v for k, v in BACKBONE.items() if k != "name"})
    save_encoder(encoder, tmp_path / "b", {"backbone": BACKBONE, "data": {"name": "demo"}})
    card = (tmp_path / "b" / "README.md").read_text()
    assert "license: unknown" in card and "license=<id>" in card and "data.license=<id>" in card
