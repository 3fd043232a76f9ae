"""``eval_data=medmnist`` (any MedMNIST-style file), its specialisations, task validation and published rows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from ssl_med.cli import main
from ssl_med.evaluators.api import evaluate, evaluate_checkpoint, published_rows
from ssl_med.evaluators.datasets import eval_data_config, load_eval_data, resolve_eval_data

from .conftest import tiny_vit
from .test_cli import encoder_run  # noqa: F401  (fixture)


def write_npz(path: Path, image_shape: tuple[int, ...], labels: np.ndarray, n: int = 12) -> Path:
    """A MedMNIST-style file: ``n`` random uint8 images ``(n, *image_shape)`` and ``labels[:n]`` per split."""
    rng = np.random.default_rng(0)
    arrays = {}
    for split in ("train", "val", "test"):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, *image_shape), dtype=np.uint8)
        arrays[f"{split}_labels"] = labels[:n].astype(np.uint8)
    np.savez_compressed(path, **arrays)
    return path


def cycle(n: int, k: int) -> np.ndarray:
    """Class ids ``0 .. k-1`` repeated, ``(n, 1)``."""
    return (np.arange(n) % k).reshape(-1, 1)


MULTI_LABEL = np.random.default_rng(1).integers(0, 2, (12, 5))
MULTI_LABEL[:2] = [[0] * 5, [1] * 5]  # every label has both values


@pytest.mark.parametrize(
    ("image_shape", "labels", "task", "classes", "dims", "channels"),
    [
        ((28, 28), cycle(12, 2), "binary", 2, 2, 1),
        ((28, 28, 3), cycle(12, 4), "multi-class", 4, 2, 3),
        ((28, 28), MULTI_LABEL, "multi-label", 5, 2, 1),
        ((28, 28, 28), cycle(12, 2), "binary", 2, 3, 1),
    ],
    ids=["binary-2d", "multiclass-rgb", "multilabel", "binary-3d"],
)
def test_generic_group_reads_task_and_classes_from_file(
    tmp_path: Path, image_shape: tuple, labels: np.ndarray, task: str, classes: int, dims: int, channels: int
) -> None:
    path = write_npz(tmp_path / "foo_bar.npz", image_shape, labels)
    cfg = eval_data_config("medmnist", [f"eval_data.path={path}"])
    assert cfg["name"] == "foo_bar" and cfg["task"] is None and cfg["published"] == []
    resolved = resolve_eval_data(cfg)
    assert (resolved["task"], resolved["spatial_dims"], resolved["image_size"]) == (task, dims, 32)
    data = load_eval_data(cfg, in_chans=channels)
    assert data.task == task and data.num_classes == classes
    assert data.images["train"].shape == (12, channels, *[32] * dims)
    expected_labels = labels if task == "multi-label" else labels[:, 0]
    np.testing.assert_array_equal(data.labels["test"], expected_labels)
    if channels == 3:  # RGB into a grey encoder: channel mean
        assert load_eval_data(cfg, in_chans=1).images["val"].shape == (12, 1, 32, 32)


def test_generic_group_on_real_breastmnist_matches_its_specialisation(shared_data: Path) -> None:
    path = shared_data / "medmnist" / "breastmnist.npz"
    generic = resolve_eval_data(
        eval_data_config("medmnist", [f"eval_data.path={path}", "eval_data.image_size=64"])
    )
    special = resolve_eval_data(eval_data_config("breastmnist", [f"eval_data.path={path}"]))
    assert generic["name"] == special["name"] == "breastmnist"
    assert generic["task"] == special["task"] == "binary" and generic["spatial_dims"] == 2
    assert published_rows(generic) == {} and len(published_rows(special)) == 4
    data = load_eval_data({**generic, "subset": 20, "image_size": 32})
    assert data.num_classes == 2 and data.images["train"].shape[1:] == (1, 32, 32)


def test_pneumoniamnist_group_on_the_subset_file(shared_data: Path) -> None:
    cfg = eval_data_config(
        "pneumoniamnist", [f"eval_data.path={shared_data}/medmnist/pneumoniamnist_subset.npz"]
    )
    resolved = resolve_eval_data(cfg)
    assert resolved["name"] == "pneumoniamnist" and resolved["task"] == "binary"
    assert published_rows(resolved)["ResNet-18 (28)"] == {"auroc": 0.944, "accuracy": 0.854}


def test_invalid_task_fails_before_any_work(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "foo.npz", (28, 28), cycle(12, 2))
    cfg = eval_data_config("medmnist", [f"eval_data.path={path}", "eval_data.task=multiclass"])
    with pytest.raises(ValueError, match=r"eval_data.task='multiclass'.*binary, multi-class, multi-label"):
        resolve_eval_data(cfg)
    with pytest.raises(ValueError, match=r"eval_data\.task="):  # before the (missing) checkpoint is looked up
        evaluate_checkpoint(tmp_path / "no-such-run", {"name": "knn"}, cfg, tmp_path / "out")
    with pytest.raises(ValueError, match=r"eval_data\.task="):  # explicit groups are checked as well
        resolve_eval_data({**cfg, "name": "x", "task": "Binary"})
    with pytest.raises(ValueError, match="does not fit the labels"):  # (N, 1) labels are not multi-label
        resolve_eval_data({**cfg, "task": "multi-label"})


def test_published_rows_are_replaced_not_merged(tmp_path: Path) -> None:
    breast = ["eval_data.path=/x/breastmnist.npz"]
    assert eval_data_config("breastmnist", [*breast, "eval_data.published=[]"])["published"] == []
    assert eval_data_config("breastmnist", [*breast, "eval_data.published=null"])["published"] is None
    mine = eval_data_config("breastmnist", [*breast, "eval_data.published=[{name: 'Mine (28)', auroc: 0.9}]"])
    assert published_rows(mine) == {"Mine (28)": {"auroc": 0.9}}

    path = write_npz(tmp_path / "foo.npz", (32, 32), cycle(12, 2))
    cfg: dict[str, Any] = eval_data_config("medmnist", [f"eval_data.path={path}", "eval_data.published=null"])
    probe = {"name": "linear_probe", "features": "pooled", "C": [1.0], "select_metric": "auroc"}
    results = evaluate(tiny_vit(), {**probe, "label_fractions": [], "batch_size": 8}, cfg, tmp_path / "out")
    assert results["published"] == {} and results["data"] == "foo"
    assert (
        json.loads((tmp_path / "out" / "results.json").read_text())["config"]["eval_data"]["task"] == "binary"
    )


def test_cli_generic_group_names_the_run_after_the_file(
    encoder_run: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = write_npz(tmp_path / "my_scans.npz", (28, 28), cycle(12, 3))
    monkeypatch.chdir(tmp_path)
    args = [
        "evaluate",
        "eval=linear_probe",
        f"checkpoint={encoder_run}",
        "eval_data=medmnist",
        f"eval_data.path={path}",
        "eval.C=[0.1,1.0]",
        "eval.label_fractions=[]",
        "baseline=false",
        "cache_dir=null",
    ]
    assert main(args) == 0
    results = json.loads((tmp_path / "outputs/eval/linear_probe-my_scans/results.json").read_text())
    assert results["data"] == "my_scans" and results["published"] == {}
    assert results["config"]["eval_data"]["task"] == "multi-class"
