"""The fine-tune evaluator on real BreastMNIST: it learns, it chooses its recipe on val, it reads the
encoder through the configured read-out."""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from ssl_med.evaluators.base import EvalContext
from ssl_med.evaluators.datasets import ClassificationData, load_eval_data
from ssl_med.evaluators.finetune import (
    Classifier,
    finetune,
    finetune_optimizer,
    predict,
    probe_head,
    refresh_head_norm,
    warn_if_one_class,
)
from ssl_med.evaluators.metrics import classification_metrics

from .conftest import tiny_vit


@pytest.fixture(scope="module")
def breast(breast_cfg: dict[str, Any]) -> ClassificationData:
    return load_eval_data(breast_cfg)


def ft_cfg(**overrides: Any) -> dict[str, Any]:
    cfg = {
        "name": "finetune", "features": "pooled", "steps": 40, "batch_size": 16, "eval_batch_size": 64,
        "eval_every": 10, "lr": [1e-3], "layer_decay": [1.0], "head_lr": 1e-2, "weight_decay": 0.05,
        "select_metric": "auroc",
    }
    cfg.update(overrides)
    return cfg


def test_finetune_learns_on_real_images_and_leaves_the_encoder_alone(breast: ClassificationData, tmp_path: Path) -> None:
    encoder = tiny_vit()
    before = {k: v.clone() for k, v in encoder.state_dict().items()}
    untrained = Classifier(encoder, breast.num_classes)
    chance = classification_metrics(predict(untrained, breast.images["test"], "binary", 64, "cpu"), breast.labels["test"], "binary")
    result = finetune(encoder, ft_cfg(), breast, EvalContext(tmp_path, "pretrained", "breast"))
    assert result.metrics["auroc"] > max(0.6, chance["auroc"] + 0.2), (result.metrics, chance)
    assert all(torch.equal(before[k], v) for k, v in encoder.state_dict().items())  # worked on a copy


def test_finetune_keeps_the_grid_point_best_on_val(
    breast: ClassificationData, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cfg = ft_cfg(steps=20, lr=[1e-5, 1e-3], layer_decay=[0.5, 1.0])
    with caplog.at_level("INFO", logger="ssl_med.evaluators.finetune"):
        result = finetune(tiny_vit(), cfg, breast, EvalContext(tmp_path, "random-init", "breast"))
    progress = [r.getMessage() for r in caplog.records if r.levelname == "INFO" and "step" in r.getMessage()]
    assert len(progress) == 4 * 2 and "[random-init] pooled lr=1e-05 layer_decay=0.5 step 10/20" in progress[0]
    grid = result.details["grid"]
    assert [(g["lr"], g["layer_decay"]) for g in grid] == [(1e-5, 0.5), (1e-5, 1.0), (1e-3, 0.5), (1e-3, 1.0)]
    best = max(grid, key=lambda g: g["val_score"])
    assert result.details["chosen"]["lr"] == best["lr"]
    assert result.details["chosen"]["layer_decay"] == best["layer_decay"]
    for g in grid:  # the kept score is the best val score seen during that run
        assert g["val_score"] == pytest.approx(max(h["val_auroc"] for h in g["history"]))


def test_classifier_reads_the_configured_readout() -> None:
    encoder = tiny_vit()
    x = torch.randn(3, 1, 32, 32)
    model = Classifier(encoder, 2, "pooled+mean_patch")
    assert model.head.in_features == 2 * encoder.embed_dim
    out = encoder(x)
    expected = model.head(torch.cat([out.pooled, out.patch_tokens.mean(dim=1)], dim=1))
    torch.testing.assert_close(model(x), expected)
    with pytest.raises(ValueError, match="patch_tokens"):
        Classifier(encoder, 2, "patch_tokens")


@pytest.mark.parametrize(("task", "head_norm"), [("binary", "none"), ("multi-class", "none"), ("binary", "batchnorm")])
def test_probe_head_reproduces_the_sklearn_probe(breast: ClassificationData, task: str, head_norm: str) -> None:
    """LP-FT's starting head gives the probabilities of an independently fitted sklearn pipeline, with the
    standardisation folded into the linear weights or held by the head's BatchNorm."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    data = breast
    if task == "multi-class":  # three classes from BreastMNIST's two: split class 1 by image brightness
        y = {s: v.copy() for s, v in breast.labels.items()}
        for s, images in breast.images.items():
            bright = images.flatten(1).mean(1).numpy() > np.median(images.flatten(1).mean(1).numpy())
            y[s][(y[s] == 1) & bright] = 2
        data = ClassificationData(**{**vars(breast), "labels": y, "task": "multi-class", "num_classes": 3})
    encoder = tiny_vit()
    model, c = probe_head(encoder, data, ft_cfg(head_probe_C=[0.1], head_norm=head_norm), "cpu", ["mean_patch"])
    assert (model.readout, c) == ("mean_patch", 0.1)
    assert isinstance(model.norm, torch.nn.BatchNorm1d) == (head_norm == "batchnorm")
    x = {s: encoder(data.images[s]).patch_tokens.mean(1).detach().numpy() for s in ("train", "val")}
    reference = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=1000)).fit(x["train"], data.labels["train"])
    ours = predict(model, data.images["val"], data.task, 64, "cpu")
    np.testing.assert_allclose(ours, reference.predict_proba(x["val"]), atol=2e-4)


@pytest.mark.parametrize("head_norm", ["none", "batchnorm"])
def test_finetune_from_a_probe_head_starts_where_the_probe_is(
    breast: ClassificationData, tmp_path: Path, head_norm: str
) -> None:
    cfg = ft_cfg(head_init="probe", head_probe_C=[1.0], steps=10, eval_every=10, lr=[1e-6], head_lr=1e-6, head_norm=head_norm)
    result = finetune(tiny_vit(), cfg, breast, EvalContext(tmp_path, "pretrained", "breast"))
    model, _ = probe_head(tiny_vit(), breast, cfg, "cpu", ["pooled"])
    start = classification_metrics(predict(model, breast.images["val"], "binary", 64, "cpu"), breast.labels["val"], "binary")
    # ten steps at LR 1e-6 barely move it: the kept val score is the probe's
    assert result.details["grid"][0]["val_score"] == pytest.approx(start["auroc"], abs=0.02)
    assert result.details["grid"][0]["history"][0]["val_auroc"] == pytest.approx(start["auroc"], abs=1e-6)
    with pytest.raises(ValueError, match="head_init"):
        finetune(tiny_vit(), ft_cfg(head_init="linear"), breast, EvalContext(tmp_path, "pretrained", "breast"))
    with pytest.raises(ValueError, match="head_norm"):
        Classifier(tiny_vit(), 2, head_norm="layernorm")


def test_finetune_optimizer_warms_up_then_decays_and_the_head_follows_lr_when_unset() -> None:
    model = Classifier(tiny_vit(), 2)
    optimizer, schedule = finetune_optimizer(model, ft_cfg(steps=20, warmup=0.25, head_lr=None), lr=1e-4, layer_decay=1.0)
    head = next(g for g in optimizer.param_groups if g["params"][0] is model.head.weight)
    lrs = []
    for _ in range(20):
        lrs.append(head["lr"])
        optimizer.step()
        schedule.step()
    # five warm-up steps rising to lr, then a half-cosine falling towards 0
    np.testing.assert_allclose(lrs[:5], [1e-4 * k / 5 for k in range(1, 6)])
    assert all(a > b for a, b in itertools.pairwise(lrs[5:])) and lrs[-1] < 1e-5
    assert all(g["lr"] == pytest.approx(head["lr"]) for g in optimizer.param_groups)  # layer_decay 1.0: one LR
    optimizer, _ = finetune_optimizer(model, ft_cfg(steps=20, head_lr=1e-2), lr=1e-4, layer_decay=1.0)
    assert [g["lr"] for g in optimizer.param_groups if g["params"][0] is model.head.weight] == [1e-2]  # no warm-up


@pytest.mark.parametrize("min_gain", [0.0, 0.01, 1.0])
def test_a_check_replaces_the_kept_weights_only_when_ahead_by_more_than_select_min_gain(
    breast: ClassificationData, tmp_path: Path, min_gain: float
) -> None:
    """The kept step is the one a plain reading of the recorded val history gives: walk the checks in order and
    move on only past a gain larger than ``select_min_gain``; 1.0 (more than AUROC can gain) keeps the probe."""
    cfg = ft_cfg(head_init="probe", head_probe_C=[1.0], steps=12, eval_every=3, lr=[3e-4], head_lr=3e-4,
                 select_min_gain=min_gain)  # fmt: skip
    result = finetune(tiny_vit(), cfg, breast, EvalContext(tmp_path, "pretrained", "breast"))
    history = result.details["grid"][0]["history"]
    kept = history[0]
    for check in history[1:]:
        if check["val_auroc"] - kept["val_auroc"] > min_gain:
            kept = check
    assert result.details["chosen"]["step"] == kept["step"]
    assert result.details["chosen"]["val_score"] == kept["val_auroc"]
    if min_gain == 1.0:
        assert kept["step"] == 0
    if min_gain == 0.0:
        assert kept["val_auroc"] == max(h["val_auroc"] for h in history)


def test_lpft_keeps_its_probe_when_fine_tuning_only_hurts_on_val(breast: ClassificationData, tmp_path: Path) -> None:
    """From a probe head, step 0 (the probe itself) is checked on val and is kept when every later check
    is worse: here an absurd LR wrecks the encoder in the first step."""
    cfg = ft_cfg(head_init="probe", head_probe_C=[1.0], steps=4, eval_every=2, lr=[10.0], head_lr=10.0)
    result = finetune(tiny_vit(), cfg, breast, EvalContext(tmp_path, "pretrained", "breast"))
    history = result.details["grid"][0]["history"]
    assert [h["step"] for h in history] == [0, 2, 4]
    model, _ = probe_head(tiny_vit(), breast, cfg, "cpu", ["pooled"])
    start = classification_metrics(predict(model, breast.images["val"], "binary", 64, "cpu"), breast.labels["val"], "binary")
    assert history[0]["val_auroc"] == pytest.approx(start["auroc"], abs=1e-6)
    assert max(h["val_auroc"] for h in history[1:]) < history[0]["val_auroc"]
    assert result.details["chosen"]["step"] == 0
    assert result.details["chosen"]["val_score"] == history[0]["val_auroc"]


def test_lpft_chooses_its_readout_and_c_on_val_like_an_independent_sklearn_search(
    breast: ClassificationData, tmp_path: Path
) -> None:
    """With a read-out list, LP-FT's probe is the (read-out, C) whose sklearn pipeline scores best on val,
    and the fine-tune trains through that read-out."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    readouts, c_values = ["pooled", "mean_patch", "pooled+mean_patch"], [0.01, 1.0]
    encoder = tiny_vit()
    with torch.no_grad():
        out = {s: encoder(breast.images[s]) for s in ("train", "val")}
    feats = {
        s: {"pooled": o.pooled, "mean_patch": o.patch_tokens.mean(1), "pooled+mean_patch": torch.cat([o.pooled, o.patch_tokens.mean(1)], 1)}
        for s, o in out.items()
    }
    reference = {}
    for mode in readouts:
        for c in c_values:
            pipe = make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=1000))
            pipe.fit(feats["train"][mode].numpy(), breast.labels["train"])
            reference[(mode, c)] = roc_auc_score(breast.labels["val"], pipe.predict_proba(feats["val"][mode].numpy())[:, 1])
    expected = max(reference, key=reference.get)
    cfg = ft_cfg(features=readouts, head_init="probe", head_probe_C=c_values, steps=2, eval_every=2)
    model, c = probe_head(encoder, breast, cfg, "cpu", readouts)
    assert (model.readout, c) == expected
    result = finetune(encoder, cfg, breast, EvalContext(tmp_path, "pretrained", "breast"))
    assert result.details["features"] == expected[0]
    assert [g["features"] for g in result.details["grid"]] == [expected[0]]
    assert result.details["grid"][0]["history"][0]["val_auroc"] == pytest.approx(reference[expected], abs=1e-3)


def test_a_readout_list_joins_the_random_head_grid(breast: ClassificationData, tmp_path: Path) -> None:
    cfg = ft_cfg(features=["pooled", "mean_patch"], steps=4, eval_every=2, layer_decay=[0.75, 1.0])
    result = finetune(tiny_vit(), cfg, breast, EvalContext(tmp_path, "random-init", "breast"))
    grid = result.details["grid"]
    assert [(g["features"], g["layer_decay"]) for g in grid] == [
        ("pooled", 0.75), ("pooled", 1.0), ("mean_patch", 0.75), ("mean_patch", 1.0)
    ]
    best = max(grid, key=lambda g: g["val_score"])
    assert result.details["chosen"]["features"] == best["features"] == result.details["features"]
    with pytest.raises(ValueError, match="cannot be fine-tuned through"):
        finetune(tiny_vit(), ft_cfg(features=["pooled", "patch_tokens"]), breast, EvalContext(tmp_path, "x", "breast"))


def test_refresh_head_norm_standardises_the_train_readout_of_the_encoder_as_it_is_now(breast: ClassificationData) -> None:
    """Precise BN: after the encoder moved (here: one block's weights scaled), the head's BatchNorm
    standardises the train read-out, flipped as training flips, exactly as an independent StandardScaler
    fitted on it."""
    from sklearn.preprocessing import StandardScaler

    model = Classifier(tiny_vit(), 2, "pooled+mean_patch", head_norm="batchnorm")
    with torch.no_grad():
        next(model.encoder.parameters()).mul_(3.0)
    images = breast.images["train"][:80]
    refresh_head_norm(model, images, 80, "cpu", torch.Generator().manual_seed(0))  # one batch: one draw per axis
    assert not model.training
    # the same flips as training draws them, one draw per image: rows flipped along H, W, both or neither
    generator = torch.Generator().manual_seed(0)
    flips = [torch.rand(len(images), generator=generator) < 0.5 for _ in range(2)]
    flipped = torch.stack([
        img.flip(*[axis + 1 for axis, f in enumerate(flips) if f[i]]) if any(f[i] for f in flips) else img
        for i, img in enumerate(images)
    ])
    assert 10 < sum(not torch.equal(a, b) for a, b in zip(flipped, images)) < 80
    out = model.encoder(flipped)
    feats = torch.cat([out.pooled, out.patch_tokens.mean(1)], dim=1).detach()
    np.testing.assert_allclose(model.norm(feats).detach().numpy(), StandardScaler().fit_transform(feats.double().numpy()), atol=2e-3)
    plain = Classifier(tiny_vit(), 2)
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    refresh_head_norm(plain, images, 32, "cpu", torch.Generator())  # no BatchNorm: nothing to refresh
    assert all(torch.equal(before[k], v) for k, v in plain.state_dict().items())


def test_weights_that_predict_one_class_on_val_are_named_in_the_log(
    breast: ClassificationData, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A head whose bias outweighs every read-out predicts the majority class for every val image: the log
    says so, naming the grid point; a probe head (two classes predicted) passes silently."""
    ctx = EvalContext(tmp_path, "random-init", "breast")
    best = {"features": "pooled", "lr": 1e-4, "layer_decay": 1.0, "step": 200}
    stuck = Classifier(tiny_vit(), breast.num_classes)
    with torch.no_grad():
        stuck.head.bias.copy_(torch.tensor([0.0, 100.0]))
    with caplog.at_level("WARNING", logger="ssl_med.evaluators.finetune"):
        assert warn_if_one_class(stuck, breast, ft_cfg(), ctx, best)
    assert "predict class 1 for every val image" in caplog.text and "lr=0.0001, layer_decay=1, step 200 of 40" in caplog.text
    caplog.clear()
    probe, _ = probe_head(tiny_vit(), breast, ft_cfg(head_probe_C=[10.0]), "cpu", ["pooled"])
    assert len(np.unique(predict(probe, breast.images["val"], "binary", 64, "cpu").argmax(1))) == 2
    with caplog.at_level("WARNING", logger="ssl_med.evaluators.finetune"):
        assert not warn_if_one_class(probe, breast, ft_cfg(), ctx, best)
    assert caplog.text == ""
