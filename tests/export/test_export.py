"""Export -> load round trips: pretraining run, every backbone in 2D and 3D, timm, hub, integrity, pickles."""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file, save_file

import ssl_med
from ssl_med.cli import main as cli
from ssl_med.encoder import Encoder
from ssl_med.export import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    IntegrityError,
    UnsafeWeightsError,
    export_encoder,
    load_pretrained,
    preprocessing_info,
    read_checkpoint_state,
    save_encoder,
)
from ssl_med.feature_model import FeatureModel
from ssl_med.hub import PICKLE_SUFFIXES, HubError, load_timm_vit_weights, ssl_med_to_timm_vit
from ssl_med.registry import BACKBONES

from .conftest import TINY_RUN

TINY = {"embed_dim": 48, "depth": 2, "patch_size": 4, "img_size": 16}


def tiny(name: str, spatial_dims: int, seed: int = 0) -> tuple[Encoder, dict]:
    """A tiny encoder and the backbone config that builds it (2 input channels; channel-adaptive ones take any)."""
    torch.manual_seed(seed)
    backbone = {"name": name, "spatial_dims": spatial_dims, **TINY}
    in_chans = inspect.signature(BACKBONES.get(name)).parameters.get("in_chans")
    if in_chans is not None and in_chans.default is not None:
        backbone["in_chans"] = 2
    encoder = BACKBONES.build(name, **{k: v for k, v in backbone.items() if k != "name"})
    return encoder.eval(), backbone


def inputs(spatial_dims: int, batch: int = 2) -> torch.Tensor:
    size = 16 if spatial_dims == 2 else 8  # 3D: 2x2x2 patches keep the sequence models quick
    return torch.rand(batch, 2, *([size] * spatial_dims), generator=torch.Generator().manual_seed(1))


def assert_same_outputs(a: Encoder, b: Encoder, x: torch.Tensor) -> None:
    with torch.no_grad():
        oa, ob = a(x, return_layers=(0,)), b(x, return_layers=(0,))
    torch.testing.assert_close(oa.pooled, ob.pooled, rtol=0, atol=0)
    torch.testing.assert_close(oa.patch_tokens, ob.patch_tokens, rtol=0, atol=0)
    torch.testing.assert_close(oa.hidden_states[0], ob.hidden_states[0], rtol=0, atol=0)


# -- a real pretraining run -------------------------------------------------------------------------
def test_pretrain_export_load_round_trip(run_dir: Path, tmp_path: Path) -> None:
    (run_dir / "eval" / "linear_probe").mkdir(parents=True, exist_ok=True)
    (run_dir / "eval" / "linear_probe" / "results.json").write_text(
        json.dumps([{"dataset": "breastmnist", "metric": "accuracy", "pretrained": 0.8125, "random_init": 0.73}])
    )
    out = export_encoder(run_dir / "checkpoints" / "last.ckpt", tmp_path / "export", license="apache-2.0")

    files = sorted(p.name for p in out.iterdir())
    assert files == ["README.md", CONFIG_NAME, "eval_results.json", WEIGHTS_NAME, "training_config.yaml"]
    assert not any(Path(f).suffix in PICKLE_SUFFIXES for f in files)
    config = json.loads((out / CONFIG_NAME).read_text())
    assert config["ssl_med_version"] == ssl_med.__version__
    assert config["backbone"]["name"] == "vit" and config["objective"]["name"] == "mae"
    assert config["data"]["name"] == "demo"
    assert config["encoder"] | {"spatial_dims": 2, "patch_size": [4, 4], "in_chans": 1, "channel_adaptive": False} == config["encoder"]
    assert config["preprocessing"]["intensity_normalisation"]["upper_percentile"] == 99.5
    assert config["preprocessing"]["input_range"] == [0.0, 1.0]
    assert len(config["weights"]["sha256"]) == 64

    # encoder weights only, equal to the checkpoint's encoder
    weights = load_file(out / WEIGHTS_NAME)
    ckpt = read_checkpoint_state(run_dir / "checkpoints" / "last.ckpt")
    assert set(weights) == set(ckpt)
    assert not any(k.startswith(("decoder", "objective", "head")) for k in weights)

    encoder = ssl_med.load_pretrained(str(out))
    assert not encoder.training and encoder.pretrained_config["weights"] == config["weights"]
    reference = BACKBONES.build("vit", **{k: v for k, v in config["backbone"].items() if k != "name"}).eval()
    reference.load_state_dict(ckpt)
    assert_same_outputs(encoder, reference, torch.rand(2, 1, 16, 16))

    card = (out / "README.md").read_text()
    front = card.split("---")[1]
    assert "library_name: ssl_med" in front and "license: apache-2.0" in front
    assert '"mae"' in front and "datasets:" in front
    assert "| dataset | metric | pretrained | random_init |" in card and "0.8125" in card
    assert "ssl_med.load_pretrained(" in card and "Not for clinical use" in card


def test_the_export_records_how_crops_were_scaled(tmp_path: Path) -> None:
    """``preprocessing.intensity_normalisation`` follows ``data.intensity_window``, so a user feeds the
    encoder images on the scale it was pretrained on."""
    encoder = BACKBONES.build("vit", spatial_dims=2, img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2)
    record = {w: preprocessing_info(encoder, {"intensity_window": w})["intensity_normalisation"] for w in ("image", "dtype", "auto")}
    assert record["image"]["method"] == "percentile" and record["image"]["upper_percentile"] == 99.5
    assert record["dtype"]["method"] == "dtype_range" and "x / 255" in record["dtype"]["formula"]
    assert "8-bit images: x / 255" in record["auto"]["formula"] and "p99.5" in record["auto"]["formula"]
    assert preprocessing_info(encoder, {})["intensity_normalisation"] == record["image"]  # configs from before the option


def test_cli_export_from_run_dir_and_encoder_dir(run_dir: Path, tmp_path: Path) -> None:
    assert cli(["export", f"checkpoint={run_dir}", f"out={tmp_path / 'a'}"]) == 0
    assert cli(["export", f"checkpoint={run_dir / 'encoder'}", f"out={tmp_path / 'b'}"]) == 0
    a, b = load_pretrained(tmp_path / "a"), load_pretrained(tmp_path / "b")
    assert_same_outputs(a, b, torch.rand(1, 1, 16, 16))
    assert cli(["export", f"checkpoint={tmp_path / 'missing'}", f"out={tmp_path / 'c'}"]) == 1


def test_teacher_weights_are_exported_on_request(run_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "dino_run"
    (run / "checkpoints").mkdir(parents=True)
    (run / "resolved_config.yaml").write_text((run_dir / "resolved_config.yaml").read_text())
    student = read_checkpoint_state(run_dir / "checkpoints" / "last.ckpt")
    state = {f"objective.encoder.{k}": v for k, v in student.items()}
    state |= {f"objective.teacher.encoder.{k}": v + 1 for k, v in student.items()}
    torch.save({"state_dict": state}, run / "checkpoints" / "last.ckpt")
    out = export_encoder(run, tmp_path / "teacher", weights="teacher")
    exported = load_file(out / WEIGHTS_NAME)
    torch.testing.assert_close(exported["cls_token"], student["cls_token"] + 1)
    assert json.loads((out / CONFIG_NAME).read_text())["exported_weights"] == "teacher"


# -- every backbone, 2D and 3D ------------------------------------------------------------------------
CASES = [(name, d) for name in BACKBONES.names() for d in (2, 3)]


@pytest.mark.parametrize(("name", "spatial_dims"), CASES)
def test_every_backbone_round_trips(name: str, spatial_dims: int, tmp_path: Path) -> None:
    encoder, backbone = tiny(name, spatial_dims)
    save_encoder(encoder, tmp_path, {"backbone": backbone, "objective": {"name": "mae"}, "data": {"name": "demo"}})
    x = inputs(spatial_dims)
    loaded = load_pretrained(tmp_path)
    assert type(loaded) is type(encoder)
    assert_same_outputs(loaded, encoder, x)

    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["encoder"]["channel_adaptive"] == (encoder.in_chans is None)
    # one call through timm too: ssl_med_<name>, or timm's own VisionTransformer for 2D ViTs
    model = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    with torch.no_grad():
        if isinstance(model, FeatureModel):  # timm's API around the encoder: forward -> pooled features
            assert config["architecture"] == f"ssl_med_{name}"
            torch.testing.assert_close(model(x), encoder(x).pooled, rtol=0, atol=0)
        else:
            assert (name, spatial_dims) == ("vit", 2)
            out = encoder(x)
            torch.testing.assert_close(model.forward_features(x), torch.cat([out.prefix_tokens, out.patch_tokens], 1))


def test_per_modality_vit_exports_as_ssl_med_architecture(tmp_path: Path) -> None:
    """A ViT with one patch kernel per sequence (``channel_tokens=per_modality``) has no timm counterpart:
    its export must name ``ssl_med_vit``, and timm must load it with identical outputs."""
    torch.manual_seed(0)
    backbone = {"name": "vit", "spatial_dims": 2, **TINY, "in_chans": 2, "channel_tokens": "per_modality"}
    encoder = BACKBONES.build("vit", **{k: v for k, v in backbone.items() if k != "name"}).eval()
    save_encoder(encoder, tmp_path, {"backbone": backbone})
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["architecture"] == "ssl_med_vit"
    model = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    x = inputs(2)
    with torch.no_grad():
        torch.testing.assert_close(model(x), encoder(x).pooled, rtol=0, atol=0)


# -- timm interoperability ---------------------------------------------------------------------------
def test_exported_vit_loads_into_timm_with_identical_outputs(tmp_path: Path) -> None:
    encoder, backbone = tiny("vit", 2)
    backbone["num_heads"] = 3
    encoder = BACKBONES.build("vit", **{k: v for k, v in backbone.items() if k != "name"}).eval()
    save_encoder(encoder, tmp_path, {"backbone": backbone})
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["architecture"].startswith("vit_")
    model = timm.create_model(
        "vit_small_patch16_224",
        pretrained=True,
        pretrained_cfg_overlay={"file": str(tmp_path / WEIGHTS_NAME)},
        **config["model_args"],
    ).eval()
    # the same through a filter function, without timm's loader
    manual = timm.create_model("vit_small_patch16_224", **config["model_args"]).eval()
    manual.load_state_dict(ssl_med_to_timm_vit(load_file(tmp_path / WEIGHTS_NAME)), strict=True)
    x = inputs(2)
    with torch.no_grad():
        out = encoder(x)
        torch.testing.assert_close(model.forward_features(x), torch.cat([out.prefix_tokens, out.patch_tokens], 1))
        torch.testing.assert_close(model(x), out.pooled)  # num_classes=0, global_pool=token: the CLS embedding
        torch.testing.assert_close(manual(x), out.pooled)


def test_timm_vit_weights_initialise_ssl_med_vit(tmp_path: Path) -> None:
    torch.manual_seed(0)
    timm_vit = timm.create_model(
        "vit_tiny_patch16_224", img_size=16, patch_size=4, embed_dim=48, depth=2, num_heads=3, in_chans=2, num_classes=5
    ).eval()
    save_file({k: v.contiguous() for k, v in timm_vit.state_dict().items()}, tmp_path / "timm.safetensors")
    encoder = BACKBONES.build("vit", spatial_dims=2, in_chans=2, num_heads=3, **TINY).eval()
    mask_token = encoder.mask_token.detach().clone()
    load_timm_vit_weights(encoder, tmp_path / "timm.safetensors")
    x = inputs(2)
    with torch.no_grad():
        out = encoder(x)
        torch.testing.assert_close(torch.cat([out.prefix_tokens, out.patch_tokens], 1), timm_vit.forward_features(x))
    torch.testing.assert_close(encoder.mask_token, mask_token)  # not in timm: keeps its initialisation

    torch.save(timm_vit.state_dict(), tmp_path / "timm.pth")
    with pytest.raises(UnsafeWeightsError, match="trust_pickle"):
        load_timm_vit_weights(encoder, tmp_path / "timm.pth")
    load_timm_vit_weights(encoder, tmp_path / "timm.pth", trust_pickle=True)

    wider = BACKBONES.build("vit", spatial_dims=2, in_chans=2, img_size=16, patch_size=4, embed_dim=96, depth=2, num_heads=3)
    with pytest.raises(ValueError, match="does not fit"):
        load_timm_vit_weights(wider, tmp_path / "timm.safetensors")


# -- integrity and pickles ---------------------------------------------------------------------------
@pytest.fixture
def exported(tmp_path: Path) -> Path:
    encoder, backbone = tiny("vit", 2)
    return save_encoder(encoder, tmp_path / "export", {"backbone": backbone})


def test_tampered_weights_are_detected(exported: Path) -> None:
    weights = exported / WEIGHTS_NAME
    raw = bytearray(weights.read_bytes())
    raw[-3] ^= 0xFF  # flip bits inside the last tensor
    weights.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError, match="sha256"):
        load_pretrained(exported)


def test_weights_that_do_not_fit_the_config_fail_clearly(exported: Path) -> None:
    config = json.loads((exported / CONFIG_NAME).read_text())
    config["backbone"]["embed_dim"] = 96
    config["backbone"]["num_heads"] = 3
    (exported / CONFIG_NAME).write_text(json.dumps(config))
    with pytest.raises(IntegrityError, match="shape mismatch"):
        load_pretrained(exported)


def test_pickle_files_are_refused_unless_trusted(exported: Path, run_dir: Path) -> None:
    reference = load_pretrained(exported)
    torch.save(load_file(exported / WEIGHTS_NAME), exported / "pytorch_model.bin")
    with pytest.raises(UnsafeWeightsError, match="trust_pickle=True"):
        load_pretrained(exported / "pytorch_model.bin")
    assert_same_outputs(load_pretrained(exported / "pytorch_model.bin", trust_pickle=True), reference, inputs(2))

    (exported / WEIGHTS_NAME).unlink()
    with pytest.raises(Exception, match="trust_pickle"):
        load_pretrained(exported)
    assert_same_outputs(load_pretrained(exported, trust_pickle=True), reference, inputs(2))

    ckpt = run_dir / "checkpoints" / "last.ckpt"
    with pytest.raises(UnsafeWeightsError):
        ssl_med.load_pretrained(ckpt)
    assert ssl_med.load_pretrained(ckpt, trust_pickle=True).embed_dim == 48


# -- the hub (no network: the download is redirected, uploads fail fast) ----------------------------
def test_load_from_hub_repo_id(exported: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    calls = {}

    def fake_snapshot_download(repo_id: str, **kwargs):
        calls.update(kwargs, repo_id=repo_id)
        return str(exported)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    encoder = ssl_med.load_pretrained("hf-hub:org/name@v1")
    assert calls["repo_id"] == "org/name" and calls["revision"] == "v1"
    assert WEIGHTS_NAME in calls["allow_patterns"] and "*.bin" not in calls["allow_patterns"]
    assert_same_outputs(encoder, load_pretrained(exported), inputs(2))


def test_hub_offline_without_cache_fails_clearly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError, match="HF_HUB_OFFLINE"):
        ssl_med.load_pretrained("hf-hub:org/name", cache_dir=tmp_path)


def test_push_fails_clearly_after_the_local_export(run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubError, match="HF_HUB_OFFLINE") as err:
        export_encoder(run_dir, tmp_path / "offline", push_to="org/name")
    assert "hf upload org/name" in str(err.value)
    assert load_pretrained(tmp_path / "offline").embed_dim == 48  # the export is complete

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    assert cli(["export", f"checkpoint={run_dir}", f"out={tmp_path / 'no_token'}", "push_to=org/name"]) == 1
    assert (tmp_path / "no_token" / WEIGHTS_NAME).is_file()

    monkeypatch.setattr(huggingface_hub, "get_token", lambda: "hf_not_a_real_token")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    with pytest.raises(HubError, match="could not push"):
        export_encoder(run_dir, tmp_path / "unreachable", push_to="org/name")
    assert (tmp_path / "unreachable" / CONFIG_NAME).is_file()


def test_a_run_exports_the_encoder_its_objective_is_evaluated_by(run_dir: Path, tmp_path: Path) -> None:
    """DINO's ``encoder/`` is its EMA teacher (what the online curve reads and DINO/DINOv2/RAD-DINO release), read back
    by ``ssl_med export``'s default; MAE, with no teacher, exports the trained encoder."""
    from hydra import compose, initialize_config_module

    from ssl_med.config import parse_pretrain_config
    from ssl_med.train.run import pretrain

    overrides = [o for o in TINY_RUN if not o.startswith("objective.")] + [
        "objective=dino", "objective.out_dim=64", "objective.hidden_dim=32", "objective.bottleneck_dim=16",
        "objective.views.global_crop_size=[16,16]", "objective.views.local_crop_size=[8,8]", "objective.views.n_local_crops=2",
    ]  # fmt: skip
    with initialize_config_module(config_module="ssl_med.conf", version_base="1.3"):
        cfg = parse_pretrain_config(compose(config_name="pretrain", overrides=overrides))
    run = tmp_path / "dino"
    pretrain(cfg, run)
    exported = load_file(run / "encoder" / WEIGHTS_NAME)
    last = run / "checkpoints" / "last.ckpt"
    teacher, student = read_checkpoint_state(last, weights="teacher"), read_checkpoint_state(last, weights="student")
    assert exported.keys() == teacher.keys() and all(torch.equal(exported[k], teacher[k]) for k in teacher)
    assert not all(torch.equal(teacher[k], student[k]) for k in teacher)  # three steps moved them apart
    assert json.loads((run / "encoder" / CONFIG_NAME).read_text())["exported_weights"] == "teacher"
    again = load_file(export_encoder(run, tmp_path / "export") / WEIGHTS_NAME)  # weights=auto
    assert all(torch.equal(again[k], teacher[k]) for k in teacher)
    assert json.loads((run_dir / "encoder" / CONFIG_NAME).read_text())["exported_weights"] == "student"  # MAE
