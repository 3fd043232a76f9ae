"""Online evaluation during pretraining: metrics on separable data, teacher features, no gradients,
and the ``online/*`` curves of a real smoke run."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ssl_med.config import OnlineEvalConfig
from ssl_med.evaluators.datasets import ClassificationData
from ssl_med.registry import BACKBONES, OBJECTIVES
from ssl_med.train.online_eval import OnlineEval, build_online_eval, online_metrics, ridge_probe_scores


def _clusters(n: int, dim: int = 16, seed: int = 0, spread: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """Two tight clusters around orthogonal directions: separable by construction."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    centres = np.eye(dim)[:2] * 3.0
    return (centres[labels] + spread * rng.standard_normal((n, dim))).astype(np.float32), labels


def test_separable_features_score_perfectly() -> None:
    train, y_train = _clusters(200, seed=0)
    val, y_val = _clusters(80, seed=1)
    m = online_metrics(train, y_train, val, y_val, "binary", 2, OnlineEvalConfig(k=10))
    assert m["knn_accuracy"] == 1.0 and m["knn_auroc"] == 1.0
    assert m["linear_accuracy"] == 1.0 and m["linear_auroc"] == 1.0


@pytest.mark.parametrize("metric", ["effective_rank", "embedding_std", "linear_ridge", "auroc"])
def test_keep_best_refuses_metrics_that_do_not_measure_the_labels(metric: str) -> None:
    """A larger effective rank, spread or ridge strength is not a better encoder: refused before any data is read."""
    cfg = OnlineEvalConfig(data="breastmnist", path="/nonexistent/breastmnist.npz", keep_best=metric)
    with pytest.raises(ValueError, match=f"online_eval.keep_best='{metric}'.*linear_auroc"):
        build_online_eval(cfg, [28, 28], 1)


def test_uninformative_features_score_at_chance() -> None:
    rng = np.random.default_rng(0)
    train, val = rng.standard_normal((400, 16)), rng.standard_normal((400, 16))
    y_train, y_val = rng.integers(0, 2, 400), rng.integers(0, 2, 400)
    m = online_metrics(train, y_train, val, y_val, "binary", 2, OnlineEvalConfig())
    assert 0.4 < m["knn_auroc"] < 0.6 and 0.4 < m["linear_auroc"] < 0.6


def test_ridge_probe_matches_lstsq_reference() -> None:
    """Closed form against numpy's least squares on the augmented system (independent solver)."""
    rng = np.random.default_rng(3)
    x, q = rng.standard_normal((50, 5)), rng.standard_normal((7, 5))
    y = rng.integers(0, 3, 50)
    ridge = 0.3
    mean, std = x.mean(0), x.std(0, ddof=1)
    xs = np.hstack([(x - mean) / std, np.ones((50, 1))])
    targets = np.eye(3)[y]
    a = np.vstack([xs, np.sqrt(ridge * 50) * np.eye(6)])
    b = np.vstack([targets, np.zeros((6, 3))])
    w = np.linalg.lstsq(a, b, rcond=None)[0]
    pred = np.hstack([(q - mean) / std, np.ones((7, 1))]) @ w
    expected = np.exp(10 * pred) / np.exp(10 * pred).sum(1, keepdims=True)
    scores, chosen = ridge_probe_scores(x, y, q, 3, ridge)
    np.testing.assert_allclose(scores, expected, rtol=1e-6, atol=1e-9)
    assert chosen == ridge


def test_multi_label_ridge_probe_matches_lstsq_reference() -> None:
    """Multi-label targets ``(N, L)`` are regressed per label around their train prevalence, against numpy's
    least squares; each score is ``sigmoid(10 (ŷ − 0.5))``, above 0.5 exactly where the regression is."""
    rng = np.random.default_rng(4)
    x, q = rng.standard_normal((60, 6)), rng.standard_normal((9, 6))
    y = (rng.random((60, 3)) < 0.4).astype(np.int64)
    ridge = 0.2
    mean, std = x.mean(0), x.std(0, ddof=1)
    xs = np.hstack([(x - mean) / std, np.ones((60, 1))])
    a = np.vstack([xs, np.sqrt(ridge * 60) * np.eye(7)])
    prevalence = y.mean(0)
    w = np.linalg.lstsq(a, np.vstack([y - prevalence, np.zeros((7, 3))]), rcond=None)[0]
    pred = prevalence + np.hstack([(q - mean) / std, np.ones((9, 1))]) @ w
    scores, chosen = ridge_probe_scores(x, y, q, 3, ridge, "multi-label")
    np.testing.assert_allclose(scores, 1 / (1 + np.exp(-10 * (pred - 0.5))), rtol=1e-6, atol=1e-9)
    assert chosen == ridge and ((scores > 0.5) == (pred > 0.5)).all()
    with pytest.raises(ValueError, match="multi-label"):
        ridge_probe_scores(x, y[:, 0], q, 2, ridge, "multi-label")


def test_multi_label_features_score_by_label() -> None:
    """Each of three labels reads one feature (ChestMNIST-style multi-label data): kNN and the ridge probe
    separate every label; features that carry none of them score at chance."""
    rng = np.random.default_rng(5)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        labels = (rng.random((n, 3)) < 0.5).astype(np.int64)
        feats = np.hstack([3.0 * labels + 0.1 * rng.standard_normal((n, 3)), rng.standard_normal((n, 5))])
        return feats.astype(np.float32), labels

    (train, y_train), (val, y_val) = draw(300), draw(120)
    m = online_metrics(train, y_train, val, y_val, "multi-label", 3, OnlineEvalConfig(k=10))
    assert m["linear_auroc"] == 1.0 and m["knn_auroc"] > 0.99 and m["linear_accuracy"] > 0.95
    noise = online_metrics(train[:, 3:], y_train, val[:, 3:], y_val, "multi-label", 3, OnlineEvalConfig(k=10))
    assert 0.35 < noise["linear_auroc"] < 0.65 and 0.35 < noise["knn_auroc"] < 0.65


def _lstsq_ridge(xs: np.ndarray, targets: np.ndarray, lam: float) -> np.ndarray:
    """Ridge weights by least squares on the augmented system (penalty ``lam * N`` on every weight)."""
    d = xs.shape[1]
    a = np.vstack([xs, np.sqrt(lam * len(xs)) * np.eye(d)])
    return np.linalg.lstsq(a, np.vstack([targets, np.zeros((d, targets.shape[1]))]), rcond=None)[0]


def _brute_force_ridge_problem(grid: list[float]) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[float, float]]:
    """Few rows and many features, so the strength matters: ``x`` ``(40, 30)``, labels, queries ``(9, 30)``, and
    the leave-one-out AUROC of every strength of ``grid`` by brute force: refit without each train row (numpy
    least squares), score the held-out rows by sklearn's AUROC."""
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(0)
    n, d = 40, 30
    y = rng.integers(0, 2, n)
    x = rng.standard_normal((n, d)) + 1.0 * y[:, None] * (np.arange(d) < 3)
    q = rng.standard_normal((9, d))
    xs = np.hstack([(x - x.mean(0)) / x.std(0, ddof=1), np.ones((n, 1))])  # statistics of all rows
    targets = np.eye(2)[y]
    loo_auroc = {}
    for lam in grid:
        held_out = np.empty(n)
        for i in range(n):
            keep = np.arange(n) != i
            # the closed form penalises lam * N with the full N; the refit keeps that penalty
            w = _lstsq_ridge(xs[keep], targets[keep], lam * n / (n - 1))
            pred = xs[i] @ w
            held_out[i] = pred[1] - pred[0]
        loo_auroc[lam] = roc_auc_score(y, held_out)
    return x, y, q, loo_auroc


BRUTE_FORCE_GRID = [1e-4, 1e-3, 1e-2, 0.1, 1.0, 10.0, 100.0]


def test_ridge_is_chosen_by_leave_one_out_on_train() -> None:
    """Against brute force: take the best strength (ties: the larger); the probe must pick the same one and
    return that strength's scores. The best one here is in the middle of the grid."""
    x, y, q, loo_auroc = _brute_force_ridge_problem(BRUTE_FORCE_GRID)
    expected = max(sorted(BRUTE_FORCE_GRID, reverse=True), key=lambda lam: loo_auroc[lam])
    assert expected not in (min(BRUTE_FORCE_GRID), max(BRUTE_FORCE_GRID))  # neither the weakest (the train fit's choice) nor the strongest
    scores, chosen = ridge_probe_scores(x, y, q, 2, BRUTE_FORCE_GRID, "binary")
    assert chosen == expected
    xs = np.hstack([(x - x.mean(0)) / x.std(0, ddof=1), np.ones((len(x), 1))])
    w = _lstsq_ridge(xs, np.eye(2)[y], chosen)
    pred = np.hstack([(q - x.mean(0)) / x.std(0, ddof=1), np.ones((9, 1))]) @ w
    np.testing.assert_allclose(scores, np.exp(10 * pred) / np.exp(10 * pred).sum(1, keepdims=True), rtol=1e-6, atol=1e-9)


def test_a_strength_at_an_end_of_the_grid_is_checked_a_decade_beyond() -> None:
    """Against brute force: with the best strength just outside a grid, the probe takes the decade beyond
    the grid's end (leave-one-out scores it higher); with the best at the grid's end, it stays there."""
    x, y, q, loo_auroc = _brute_force_ridge_problem(BRUTE_FORCE_GRID)
    best = max(sorted(BRUTE_FORCE_GRID, reverse=True), key=lambda lam: loo_auroc[lam])
    above = [best * 10, best * 100]  # the best is a decade below the grid
    below = [best / 100, best / 10]  # ... a decade above it
    assert ridge_probe_scores(x, y, q, 2, above, "binary")[1] == pytest.approx(best)
    assert ridge_probe_scores(x, y, q, 2, below, "binary")[1] == pytest.approx(best)
    ends_at_best = [best, best * 10]
    assert loo_auroc[best / 10] <= loo_auroc[best]
    assert ridge_probe_scores(x, y, q, 2, ends_at_best, "binary")[1] == best


def _tiny_data(n: int = 24) -> ClassificationData:
    g = torch.Generator().manual_seed(0)
    images = {s: torch.rand(n, 1, 16, 16, generator=g) for s in ("train", "val", "test")}
    labels = {s: np.arange(n) % 2 for s in ("train", "val", "test")}
    return ClassificationData("toy", "binary", images, labels, 2)


class _Module(torch.nn.Module):
    """Stands in for the Lightning module: ``objective`` and ``device`` are all the callback reads."""

    def __init__(self, objective: torch.nn.Module) -> None:
        super().__init__()
        self.objective = objective
        self.device = torch.device("cpu")


def test_online_eval_uses_the_teacher_and_builds_no_graph() -> None:
    encoder = BACKBONES.build("vit", spatial_dims=2, img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2)
    dino = OBJECTIVES.build("dino", encoder=encoder, out_dim=16, hidden_dim=16, bottleneck_dim=8, views={"n_local_crops": 1})
    with torch.no_grad():  # make teacher and student differ
        for p in dino.teacher["encoder"].parameters():
            p.add_(0.5)
    data = _tiny_data()
    callback = OnlineEval(OnlineEvalConfig(data="toy", k=5), data)
    assert "test" not in callback.images, "the test split is never kept"
    captured: list[torch.nn.Module] = []
    import ssl_med.train.online_eval as online_eval

    original = online_eval.extract_features

    def spy(enc, images, *args, **kwargs):
        captured.append(enc)
        assert not torch.is_grad_enabled()
        return original(enc, images, *args, **kwargs)

    dino.train()
    online_eval.extract_features = spy
    try:
        metrics = callback.evaluate(_Module(dino))
    finally:
        online_eval.extract_features = original
    assert captured and all(enc is dino.teacher["encoder"] for enc in captured)
    assert set(metrics) >= {"knn_accuracy", "knn_auroc", "linear_auroc", "embedding_std"}
    assert all(p.grad is None for p in dino.parameters())
    assert dino.encoder.training, "the student's mode is left as it was"

    mae = OBJECTIVES.build("mae", encoder=encoder, decoder_dim=16, decoder_depth=1, decoder_heads=2)
    assert mae.eval_encoder() is encoder


def test_the_student_is_read_beside_the_teacher_only_when_asked() -> None:
    from ssl_med.train.online_eval import QUALITY_METRICS

    encoder = BACKBONES.build("vit", spatial_dims=2, img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2)
    dino = OBJECTIVES.build("dino", encoder=encoder, out_dim=16, hidden_dim=16, bottleneck_dim=8, views={"n_local_crops": 1})
    with torch.no_grad():
        for p in dino.teacher["encoder"].parameters():
            p.add_(0.5)
    import ssl_med.train.online_eval as online_eval

    captured: list[torch.nn.Module] = []
    original = online_eval.extract_features
    online_eval.extract_features = lambda enc, *a, **k: captured.append(enc) or original(enc, *a, **k)
    try:
        asked = OnlineEval(OnlineEvalConfig(data="toy", k=5, student=True), _tiny_data())
        student = asked.student_metrics(_Module(dino))
        assert captured and all(enc is dino.encoder for enc in captured), "the student, not the teacher"
        assert set(student) == {f"student_{name}" for name in QUALITY_METRICS}
        assert student["student_linear_auroc"] == asked.evaluate(_Module(dino), dino.encoder)["linear_auroc"]
        captured.clear()
        assert OnlineEval(OnlineEvalConfig(data="toy", k=5), _tiny_data()).student_metrics(_Module(dino)) == {}
        mae = OBJECTIVES.build("mae", encoder=encoder, decoder_dim=16, decoder_depth=1, decoder_heads=2)
        assert asked.student_metrics(_Module(mae)) == {}, "no teacher: the student is what the curve reads already"
        assert not captured
    finally:
        online_eval.extract_features = original


def test_keep_best_exports_the_student_when_it_reads_better_on_val(tmp_path: Path) -> None:
    import json

    from safetensors.torch import load_file

    kwargs = dict(spatial_dims=2, img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=2)
    dino = OBJECTIVES.build("dino", encoder=BACKBONES.build("vit", **kwargs), out_dim=16, hidden_dim=16, bottleneck_dim=8,
                            views={"n_local_crops": 1})  # fmt: skip
    with torch.no_grad():
        for p in dino.teacher["encoder"].parameters():
            p.add_(0.5)
    callback = OnlineEval(OnlineEvalConfig(data="toy", student=True), _tiny_data(), best_dir=tmp_path / "best",
                          export_config={"backbone": {"name": "vit", **kwargs}})  # fmt: skip
    module = _Module(dino)

    def kept() -> tuple[str, dict[str, torch.Tensor]]:
        config = json.loads((tmp_path / "best" / "config.json").read_text())
        return config["exported_weights"], load_file(tmp_path / "best" / "model.safetensors")

    callback._keep_if_best(1, {"linear_auroc": 0.7, "student_linear_auroc": 0.6}, module)
    weights, state = kept()
    assert weights == "teacher" and torch.equal(state["pos_embed"], dino.teacher["encoder"].pos_embed)
    callback._keep_if_best(2, {"linear_auroc": 0.65, "student_linear_auroc": 0.8}, module)
    weights, state = kept()
    assert weights == "student" and torch.equal(state["pos_embed"], dino.encoder.pos_embed)
    assert callback.best["step"] == 2 and callback.best["value"] == 0.8
    callback._keep_if_best(3, {"linear_auroc": 0.75, "student_linear_auroc": 0.7}, module)
    assert callback.best["step"] == 2, "0.75 does not beat the student's 0.8"


def test_student_curves_share_the_teachers_panel_and_the_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import json

    import ssl_med.evaluators.plots as plots
    from ssl_med.evaluators.report import collect_online, write_summary
    from ssl_med.train.plots import plot_training_curves

    records = [{"step": s, "train/loss": 1.0 / (s + 1), "online/linear_auroc": 0.6 + s / 100,
                "online/student_linear_auroc": 0.65 + s / 200} for s in (0, 10, 20)]  # fmt: skip
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    figures = []
    monkeypatch.setattr(plots, "save_figure", lambda fig, path, dpi=100: figures.append(fig) or path)
    plot_training_curves(tmp_path / "metrics.jsonl", tmp_path / "curves.png")
    titles = [ax.get_title() for ax in figures[0].axes]
    assert titles == ["train/loss", "online/linear_auroc"], "no panel of its own for the student"
    labels = [line.get_label() for line in figures[0].axes[1].lines]
    assert "teacher" in labels and "student" in labels

    history = [{"step": 0, "knn_accuracy": 0.5, "knn_auroc": 0.5, "linear_auroc": 0.6, "student_linear_auroc": 0.6},
               {"step": 20, "knn_accuracy": 0.7, "knn_auroc": 0.7, "linear_auroc": 0.8, "student_linear_auroc": 0.75}]  # fmt: skip
    (tmp_path / "online_eval.json").write_text(json.dumps({"data": "toy", "history": history}))
    earlier = tmp_path / "earlier-20261201-120000"  # an earlier run set aside in the run folder: not a run of its own
    earlier.mkdir()
    (earlier / "online_eval.json").write_text(json.dumps({"data": "toy", "history": history[:1]}))
    (row,) = collect_online(tmp_path)
    assert row["student linear_auroc"] == 0.75 and "student knn_auroc" not in row
    assert "student linear_auroc" in write_summary(tmp_path).read_text()


def test_smoke_pretrain_logs_online_metrics(tmp_path: Path, shared_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ssl_med.train import run as run_module
    from tests.train.test_pretrain import config, scalars

    monkeypatch.setenv("SSL_MED_SHARED_DATA", str(shared_data))
    cfg = config(
        "trainer.max_steps=4",
        "online_eval.data=breastmnist",
        "online_eval.every_n_steps=2",
        "online_eval.max_train=64",
        "online_eval.max_val=32",
    )
    run_module.pretrain(cfg, tmp_path)
    knn = scalars(tmp_path, "online/knn_accuracy")
    assert len(knn) == 3, "before step 1, at step 2 and at step 4"
    assert all(0.0 <= v <= 1.0 for v in knn)
    assert len(scalars(tmp_path, "online/linear_auroc")) == 3
    assert (tmp_path / "training_curves.png").stat().st_size > 1000

    import json

    import ssl_med

    best = json.loads((tmp_path / "encoder_best" / "config.json").read_text())["selected_on"]
    record = json.loads((tmp_path / "online_eval.json").read_text())
    assert best.pop("val") == "linear_auroc"
    assert best["step"] in (2, 4) and best == record["best"], "the best val step (never step 0) is exported"
    assert best["linear_auroc"] == max(h["linear_auroc"] for h in record["history"][1:])
    ssl_med.load_pretrained(tmp_path / "encoder_best")

    from ssl_med.evaluators.report import write_summary

    summary = write_summary(tmp_path).read_text()
    assert "Online evaluation" in summary and "breastmnist" in summary, "ssl_med report lists the online curve's last value"


def test_a_file_of_ones_own_is_named_after_the_file(tmp_path: Path, shared_data: Path) -> None:
    """``online_eval.data=medmnist online_eval.path=<file>``: the log and the curve file name the file, not the group."""
    import shutil

    file = tmp_path / "my_ultrasound.npz"
    shutil.copy(shared_data / "medmnist" / "breastmnist.npz", file)
    cfg = OnlineEvalConfig(data="medmnist", path=str(file), max_train=32, max_val=16, keep_best=None)
    callback = build_online_eval(cfg, [28, 28], 1)
    assert callback is not None and callback.name == "my_ultrasound"
    assert set(callback.labels) == {"train", "val"} and len(callback.labels["val"]) == 16


def test_a_multi_label_file_is_read_online(tmp_path: Path) -> None:
    """A MedMNIST-style multi-label file (``(N, L)`` {0, 1} labels, as ChestMNIST) is accepted: the callback
    keeps its label matrix and evaluates an encoder on it."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 40), ("val", 20), ("test", 20)):
        arrays[f"{split}_images"] = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        arrays[f"{split}_labels"] = (rng.random((n, 4)) < 0.5).astype(np.uint8)
    np.savez(tmp_path / "chest_like.npz", **arrays)
    cfg = OnlineEvalConfig(data="medmnist", path=str(tmp_path / "chest_like.npz"), keep_best=None)
    callback = build_online_eval(cfg, [28, 28], 1)
    assert callback is not None and callback.task == "multi-label" and callback.labels["val"].shape == (20, 4)
    encoder = BACKBONES.build("vit", spatial_dims=2, in_chans=1, img_size=28, patch_size=7, embed_dim=32, depth=1, num_heads=2)
    mae = OBJECTIVES.build("mae", encoder=encoder, decoder_dim=16, decoder_depth=1, decoder_heads=2)
    m = callback.evaluate(_Module(mae))
    assert all(np.isfinite(m[k]) for k in ("knn_auroc", "linear_auroc", "linear_accuracy"))


def test_a_ridge_beyond_the_grid_is_warned_once(caplog: pytest.LogCaptureFixture) -> None:
    """Inside the grid or at an end (the decade beyond scored lower) there is nothing to say; a strength
    outside it means the grid cut the search short."""
    import logging

    callback = OnlineEval(OnlineEvalConfig(data="toy", ridge=[1e-3, 1e-2, 1e-1]), _tiny_data())
    with caplog.at_level(logging.WARNING, logger="ssl_med.train.online_eval"):
        for step, ridge in enumerate([1e-2, 1e-3, 1e-1]):
            callback._warn_beyond_grid(step, ridge)
        assert not caplog.records, "a strength inside the grid or at an end is not warned about"
        callback._warn_beyond_grid(3, 1e-4)
        callback._warn_beyond_grid(4, 1.0)
    assert len(caplog.records) == 1, "once per run"
    assert "0.0001, a decade beyond the smallest strength of online_eval.ridge" in caplog.messages[0]


@pytest.mark.parametrize("killed_step_6, best_step", [(0.7, 2), (0.95, 6)])
def test_a_resumed_run_continues_its_curve_and_keeps_its_best_encoder(
    killed_step_6: float, best_step: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Killed at step 7 (checkpoint at step 4), the run resumes from step 4 and repeats step 6, which now
    reads 0.55: the curve holds every step once, and the kept encoder is the best one evaluated, by either
    attempt — step 2's 0.9, or the killed attempt's step 6 where it read 0.95 and was exported before the
    kill — never the repeated step 6 that read worse; ``metrics.jsonl`` keeps the loss logged before step 4."""
    import json

    from ssl_med.train import run as run_module
    from ssl_med.train.loggers import read_metrics
    from ssl_med.train.module import PretrainModule
    from tests.evaluators.test_medmnist_group import cycle, write_npz
    from tests.train.test_pretrain import Crash, config

    scripted = {0: 0.5, 2: 0.9, 4: 0.6, 6: killed_step_6, 8: 0.65}  # val linear AUROC by step
    original_evaluate = OnlineEval.evaluate

    def evaluate(self, pl_module, encoder=None):
        metrics = original_evaluate(self, pl_module, encoder)
        return {**metrics, "linear_auroc": scripted[pl_module.trainer.global_step]}

    monkeypatch.setattr(OnlineEval, "evaluate", evaluate)
    cfg = config(
        "trainer.max_steps=8", "trainer.checkpoint_every_n_steps=4", "trainer.log_every_n_steps=1",
        "online_eval.data=medmnist", f"online_eval.path={write_npz(tmp_path / 'toy.npz', (28, 28), cycle(32, 2), n=32)}",
        "online_eval.every_n_steps=2", "online_eval.student=false",
    )  # fmt: skip
    original_step = PretrainModule.training_step

    def crashing_step(self, batch, batch_idx):
        if self.global_step == 7:
            raise Crash("simulated kill at step 7")
        return original_step(self, batch, batch_idx)

    run_dir = tmp_path / "run"
    monkeypatch.setattr(PretrainModule, "training_step", crashing_step)
    with pytest.raises(Crash):
        run_module.pretrain(cfg, run_dir)
    before = read_metrics(run_dir / "metrics.jsonl")["train/loss"]
    monkeypatch.setattr(PretrainModule, "training_step", original_step)
    scripted[6] = 0.55  # the repeated step reads differently (a run is not bit-reproducible under every setting)
    run_module.pretrain(cfg, run_dir)  # resume=auto: from step 4

    record = json.loads((run_dir / "online_eval.json").read_text())
    assert [h["step"] for h in record["history"]] == [0, 2, 4, 6, 8]
    assert [h["linear_auroc"] for h in record["history"]] == [0.5, 0.9, 0.6, 0.55, 0.65]
    best = json.loads((run_dir / "encoder_best" / "config.json").read_text())["selected_on"]
    assert best["step"] == best_step and best["linear_auroc"] == max(0.9, killed_step_6)
    assert record["best"] == {k: v for k, v in best.items() if k != "val"}, "the record names the encoder on disk"
    metrics = read_metrics(run_dir / "metrics.jsonl")
    assert [s for s, _ in metrics["online/linear_auroc"]] == [0, 2, 4, 6, 8]
    assert metrics["train/loss"][: len(before) - 3] == before[: len(before) - 3], "the loss before step 4 is kept"
