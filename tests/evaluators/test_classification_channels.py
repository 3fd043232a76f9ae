"""Classification evaluators on a subset of named channels (eval.channels / eval.channel_subsets, issue #19)
on a synthetic two-channel MedMNIST-style file whose label is carried by channel "b" alone (channel "a" is
noise): absent channels zero-filled for fixed-channel encoders, omitted (bound by name) for channel-adaptive
ones, one row per subset, and clear errors before any work."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ssl_med.evaluators.api import evaluate
from ssl_med.evaluators.base import EvalContext
from ssl_med.evaluators.channels import ChannelMaskedEncoder, check_channel_request, select_channels
from ssl_med.evaluators.datasets import load_eval_data, resolve_eval_data
from ssl_med.evaluators.knn import knn
from ssl_med.evaluators.linear_probe import linear_probe
from ssl_med.registry import BACKBONES

SIZE = 16
COUNTS = {"train": 80, "val": 40, "test": 100}


def write_npz(path: Path, seed: int = 0) -> Path:
    """``(N, 16, 16, 2)`` uint8 images, channels last: "a" uniform noise, "b" a level set by the label."""
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in COUNTS.items():
        y = np.arange(n) % 2
        a = rng.integers(0, 256, (n, SIZE, SIZE))
        b = 60 + 120 * y[:, None, None] + rng.integers(0, 40, (n, SIZE, SIZE))
        arrays[f"{split}_images"] = np.stack([a, b], axis=-1).astype(np.uint8)
        arrays[f"{split}_labels"] = y[:, None].astype(np.int64)
    np.savez(path, **arrays)
    return path


@pytest.fixture(scope="module")
def data_cfg(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    path = write_npz(tmp_path_factory.mktemp("npz") / "twochan.npz")
    return {"name": "twochan", "kind": "medmnist", "path": str(path), "task": None, "spatial_dims": None,
            "image_size": SIZE, "subset": None, "channel_names": ["a", "b"]}  # fmt: skip


def vit(channel_tokens: str = "fused") -> Any:
    torch.manual_seed(0)
    return BACKBONES.build(
        "vit", spatial_dims=2, in_chans=2, img_size=SIZE, patch_size=8, embed_dim=32, depth=2, num_heads=2,
        channel_tokens=channel_tokens,
    ).eval()


def chada() -> Any:
    torch.manual_seed(0)
    return BACKBONES.build(
        "chada_vit", spatial_dims=2, img_size=SIZE, patch_size=8, embed_dim=32, depth=2, num_heads=2,
        channel_vocab=["a", "b"],
    ).eval()


def probe_cfg(**overrides: Any) -> dict[str, Any]:
    cfg = {"name": "linear_probe", "features": "pooled", "select_on": "val", "C": [0.1, 1.0, 10.0],
           "select_metric": "auroc", "max_iter": 500, "label_fractions": [], "seeds": [0], "batch_size": 64,
           "channels": None, "channel_subsets": None}  # fmt: skip
    return {**cfg, **overrides}


def record_inputs(encoder: torch.nn.Module) -> list[tuple[torch.Tensor, dict[str, Any]]]:
    """Every ``(x, kwargs)`` the encoder's forward receives from now on."""
    calls: list[tuple[torch.Tensor, dict[str, Any]]] = []
    encoder.register_forward_pre_hook(lambda _, args, kwargs: calls.append((args[0], kwargs)), with_kwargs=True)
    return calls


def test_a_two_channel_file_loads_with_its_channel_names(data_cfg: dict[str, Any]) -> None:
    data = load_eval_data(data_cfg, 2)
    assert data.channel_names == ["a", "b"] and data.images["train"].shape == (80, 2, SIZE, SIZE)
    averaged = load_eval_data(data_cfg, 1)
    assert averaged.channel_names is None and averaged.images["train"].shape[1] == 1
    assert load_eval_data(data_cfg, None).channel_names == ["a", "b"]


def test_the_probe_scores_the_label_channel_high_and_the_noise_channel_near_chance(
    data_cfg: dict[str, Any], tmp_path: Path
) -> None:
    data = load_eval_data(data_cfg, 2)
    ctx = EvalContext(tmp_path, "pretrained", "twochan", "cpu", tmp_path / "cache", 0)
    b = linear_probe(vit(), probe_cfg(channels=["b"]), data, ctx).metrics["auroc"]
    a = linear_probe(vit(), probe_cfg(channels=["a"]), data, ctx).metrics["auroc"]
    assert b > 0.95 and 0.3 < a < 0.7, (a, b)
    # one row per subset; the feature cache keeps the subsets apart (same encoder, other images)
    table = linear_probe(vit(), probe_cfg(channel_subsets=[["b"], ["a"], ["a", "b"]]), data, ctx)
    assert [r["subset"] for r in table.details["subsets"]] == ["b", "a", "a+b"]
    assert table.metrics["b/auroc"] == pytest.approx(b) and table.metrics["a/auroc"] == pytest.approx(a)
    assert table.metrics["auroc"] == table.metrics["b/auroc"] and table.metrics["a+b/auroc"] > 0.9


def test_a_fixed_channel_vit_gets_the_absent_channel_exactly_zero(data_cfg: dict[str, Any], tmp_path: Path) -> None:
    data = load_eval_data(data_cfg, 2)
    encoder = vit()
    calls = record_inputs(encoder)
    cfg = {"name": "knn", "features": "pooled", "k": 5, "temperature": 0.07, "batch_size": 64, "channels": ["B"]}
    result = knn(encoder, cfg, data, EvalContext(tmp_path, "pretrained", "twochan", "cpu", None, 0))
    assert result.metrics["accuracy"] > 0.9
    seen = torch.cat([x for x, _ in calls])
    full = torch.cat(list(data.images.values()))  # every split, in order
    assert seen.shape == full.shape and not seen[:, 0].any() and full[:, 0].any()
    torch.testing.assert_close(seen[:, 1], full[:, 1])
    assert all("channel_names" not in kwargs for _, kwargs in calls)


def test_a_per_modality_vit_leaves_the_absent_channel_out(data_cfg: dict[str, Any]) -> None:
    data = load_eval_data(data_cfg, 2)
    sub, encoder = select_channels(data, vit("per_modality"), ["b"])
    assert isinstance(encoder, ChannelMaskedEncoder) and encoder.present.tolist() == [False, True]
    assert not sub.images["val"][:, 0].any()


def test_a_channel_adaptive_encoder_receives_only_the_requested_names(data_cfg: dict[str, Any], tmp_path: Path) -> None:
    data = load_eval_data(data_cfg, 1)  # what evaluation loads for an encoder without a channel count
    encoder = chada()
    calls = record_inputs(encoder)
    result = linear_probe(encoder, probe_cfg(channels=["b"]), data, EvalContext(tmp_path, "pretrained", "k", "cpu"))
    assert result.metrics["auroc"] > 0.9
    assert calls and all(x.shape[1] == 1 and kwargs["channel_names"] == [["b"]] * len(x) for x, kwargs in calls)
    full = load_eval_data(data_cfg, None)
    torch.testing.assert_close(torch.cat([x for x, _ in calls])[: COUNTS["train"]], full.images["train"][:, 1:])


def test_unknown_or_unnamed_channels_fail_before_any_work(data_cfg: dict[str, Any], tmp_path: Path) -> None:
    encoder = vit()
    encoder.register_forward_pre_hook(lambda *_: pytest.fail("the encoder ran"))
    with pytest.raises(ValueError, match=r"eval\.channels: 'flair' is not a channel of twochan; its channels are \['a', 'b'\]"):
        evaluate(encoder, probe_cfg(channels=["flair"]), data_cfg, tmp_path / "x")
    with pytest.raises(ValueError, match=r"eval\.channel_subsets: 'c' is not a channel.*\['a', 'b'\]"):
        check_channel_request({"channel_subsets": [["a"], ["c"]]}, data_cfg)
    unnamed = {**data_cfg, "channel_names": None}
    with pytest.raises(ValueError, match=r"eval\.channels=\['b'\]: twochan does not name its channels; set eval_data\.channel_names"):
        evaluate(encoder, probe_cfg(channels=["b"]), unnamed, tmp_path / "y")
    with pytest.raises(ValueError, match="not both"):
        check_channel_request({"channels": ["a"], "channel_subsets": [["b"]]}, data_cfg)
    with pytest.raises(ValueError, match=r"channel_names=\['a', 'b', 'c'\] names 3 channels but .* holds 1-channel 3D images"):
        resolve_eval_data({**data_cfg, "channel_names": ["a", "b", "c"]})
    assert not (tmp_path / "x").exists()


def test_finetune_reports_one_row_per_subset(data_cfg: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = {"name": "finetune", "features": "pooled", "steps": 2, "batch_size": 8, "eval_batch_size": 64,
           "eval_every": 2, "lr": [1e-4], "layer_decay": [1.0], "head_lr": 1e-3, "weight_decay": 0.05,
           "select_metric": "auroc", "head_init": "random", "channels": None,
           "channel_subsets": [["b"], ["a"]]}  # fmt: skip
    results = evaluate(vit(), cfg, data_cfg, tmp_path, baseline=vit())
    stored = json.loads((tmp_path / "results.json").read_text())
    for row in stored["rows"]:
        assert [s["subset"] for s in row["details"]["subsets"]] == ["b", "a"]
        assert {"b/auroc", "a/auroc", "auroc"} <= set(row["metrics"])
        assert row["details"]["subsets"][0]["chosen"]["lr"] == 1e-4
    assert results["rows"][0]["metrics"]["auroc"] == results["rows"][0]["metrics"]["b/auroc"]
    markdown = (tmp_path / "results.md").read_text()
    assert "Per channel subset" in markdown
    for encoder in ("pretrained", "random-init"):
        for subset in ("b", "a"):
            assert f"| {encoder} | {subset} |" in markdown
    assert "b/auroc" not in markdown.split("Per channel subset")[0]
    printed = capsys.readouterr().out
    assert "[finetune / twochan / pretrained / b]" in printed and "[finetune / twochan / random-init / a]" in printed
