"""``evaluate(encoder, eval_cfg, data_cfg, out_dir)``: the one entry point (CLI and trainer).

It loads the labelled data, runs the registered evaluator ``eval_cfg['name']`` on the encoder and on
a random-init baseline (same backbone config, fresh weights), and writes ``results.json``,
``results.md``, TensorBoard scalars and plots into ``out_dir``. The trainer can call it right
after pretraining::

    from ssl_med.evaluators.api import evaluate, random_init_like
    evaluate(encoder, eval_cfg, data_cfg, run_dir / "eval" / name, baseline=random_init_like(encoder_dir))
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import torch

from ssl_med.build import build_encoder
from ssl_med.encoder import Encoder
from ssl_med.evaluators.base import EvalContext, EvalResult
from ssl_med.evaluators.channels import check_channel_request
from ssl_med.evaluators.datasets import ClassificationData, load_eval_data, resolve_eval_data
from ssl_med.evaluators.plots import finetune_curves, finetune_curves_plot, label_efficiency_plot
from ssl_med.evaluators.report import write_results
from ssl_med.registry import EVALUATORS, OBJECTIVES
from ssl_med.weights import CONFIG_NAME, is_sharded_checkpoint


def resolve_encoder_dir(checkpoint: str | Path) -> Path:
    """An export folder (``config.json`` + ``model.safetensors``) or a run folder holding ``encoder/``.

    A checkpoint (a ``.ckpt`` file, a sharded run's checkpoint folder, or a run folder with checkpoints
    but no ``encoder/`` yet, as an interrupted run leaves it) is refused with the ``ssl_med export``
    command that turns it into an export folder.
    """
    path = Path(checkpoint)
    for candidate in (path, path / "encoder"):
        if (candidate / CONFIG_NAME).is_file():
            return candidate
    if path.suffix == ".ckpt" or is_sharded_checkpoint(path) or (path / "checkpoints" / "last.ckpt").exists():
        raise FileNotFoundError(
            f"{path} is a pretraining checkpoint, not an encoder export: write one with "
            f"`ssl_med export checkpoint={path} out=DIR` and evaluate DIR"
        )
    raise FileNotFoundError(f"{path} is neither an encoder export folder nor a run folder with encoder/")


def random_init_like(encoder_dir: str | Path, seed: int = 0) -> Encoder:
    """The backbone described by ``encoder_dir/config.json``, freshly initialised with ``seed``."""
    config = json.loads((Path(encoder_dir) / CONFIG_NAME).read_text())
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        return build_encoder(config["backbone"]).eval()
    finally:
        torch.random.set_rng_state(state)


def dataset_key(data_cfg: dict[str, Any], in_chans: int) -> str:
    """``<name>-<hash of the data config>`` for the feature cache (the published rows do not count)."""
    keyed = {k: v for k, v in data_cfg.items() if k != "published"}
    digest = hashlib.sha256(json.dumps({**keyed, "in_chans": in_chans}, sort_keys=True, default=str).encode())
    return f"{data_cfg['name']}-{digest.hexdigest()[:10]}"


def published_rows(data_cfg: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``eval_data.published`` as ``{name: {metric: value}}``.

    The config holds a list ``[{name: "ResNet-18 (28)", auroc: 0.901, accuracy: 0.863}, ...]`` so that
    a command-line override replaces the rows instead of merging into them (``eval_data.published=[]``
    or ``=null`` clears them); a ``{name: metrics}`` dict (Python callers) is taken as it is.
    """
    rows = data_cfg.get("published") or []
    if isinstance(rows, dict):
        return {str(k): dict(v) for k, v in rows.items()}
    out = {}
    for row in rows:
        if not isinstance(row, dict) or "name" not in row:
            raise ValueError(f"eval_data.published rows need a 'name' and metrics, got {row!r}")
        out[str(row["name"])] = {k: v for k, v in row.items() if k != "name"}
    return out


def match_encoder(
    eval_cfg: dict[str, Any], data_cfg: dict[str, Any], encoder_config: dict[str, Any]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fill the settings left to the encoder: ``eval.features=auto`` (alone or in a read-out list) -> the
    pretraining objective's :attr:`~ssl_med.objective.Objective.eval_features` (``mean_patch`` for
    MAE-family encoders, whose CLS token no loss trains; ``pooled`` otherwise), and ``eval_data.image_size=null`` on classification
    files -> the encoder's input size, so that evaluation sees the pretraining geometry."""
    from ssl_med.encoder import config_input_size

    eval_cfg, data_cfg = dict(eval_cfg), dict(data_cfg)
    objective = (encoder_config.get("objective") or {}).get("name")
    own = OBJECTIVES.get(objective).eval_features if objective in OBJECTIVES else "pooled"
    features = eval_cfg.get("features")
    if features == "auto":
        eval_cfg["features"] = own
    elif isinstance(features, (list, tuple)):  # a read-out grid (probe or fine-tune): auto -> the objective's, deduplicated
        eval_cfg["features"] = list(dict.fromkeys(own if f == "auto" else f for f in features))
    size = config_input_size(encoder_config.get("backbone") or {})
    if data_cfg.get("image_size") is None and data_cfg.get("kind") == "medmnist" and size and len(set(size)) == 1:
        data_cfg["image_size"] = size[0]
    return eval_cfg, data_cfg


def pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def evaluate(
    encoder: Encoder,
    eval_cfg: dict[str, Any],
    data_cfg: dict[str, Any],
    out_dir: str | Path,
    *,
    baseline: Encoder | None = None,
    checkpoint: str | None = None,
    encoder_config: dict[str, Any] | None = None,
    device: str = "cpu",
    cache_dir: str | Path | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Run ``eval_cfg['name']`` on ``encoder`` (and ``baseline``, the random-init row) and write the results.

    Args:
        encoder: the encoder to judge (weights are not modified; evaluators work on copies).
        eval_cfg: the ``eval`` config group as a dict (``name`` + evaluator settings).
        data_cfg: the ``eval_data`` config group as a dict (``name``, ``kind``, paths, sizes); fields
            left null for the data to decide (MedMNIST task, dims, size) are filled in first.
        out_dir: output folder (created).
        baseline: same architecture with random weights; ``None`` skips the baseline row.
        checkpoint, encoder_config: recorded in ``results.json`` (provenance, sweep summaries).
        device: ``cpu``, ``cuda``, ``auto``.
        cache_dir: feature cache folder (``None``: no caching).
        seed: seed for subsets, heads and decoders.

    Returns:
        the ``results.json`` content (see :mod:`ssl_med.evaluators.report`).
    """
    eval_cfg, data_cfg = match_encoder(eval_cfg, data_cfg, encoder_config or {})
    data_cfg = resolve_eval_data(data_cfg)
    check_channel_request(eval_cfg, data_cfg)
    published = published_rows(data_cfg)
    out = Path(out_dir)
    device = pick_device(device)
    evaluator = EVALUATORS.get(eval_cfg["name"])
    if int(data_cfg["spatial_dims"]) != encoder.spatial_dims:
        raise ValueError(
            f"eval_data={data_cfg['name']} is {data_cfg['spatial_dims']}D, the encoder {encoder.spatial_dims}D"
        )
    in_chans = encoder.in_chans or 1
    data = load_eval_data(data_cfg, in_chans)
    key = dataset_key(data_cfg, in_chans)
    encoders = [("pretrained", encoder)] + ([("random-init", baseline)] if baseline is not None else [])
    rows = []
    for label, model in encoders:
        ctx = EvalContext(out, label, key, device, Path(cache_dir) if cache_dir else None, seed)
        result: EvalResult = evaluator(model, eval_cfg, data, ctx)
        rows.append({"encoder": label, "metrics": result.metrics, "details": result.details})
        for subset, metrics in [("", result.metrics)] + [
            (f" / {row['subset']}", row["metrics"]) for row in result.details.get("subsets", [])
        ]:
            print(
                f"[{eval_cfg['name']} / {data_cfg['name']} / {label}{subset}] "
                + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items() if "/" not in k)
            )
    results = {
        "eval": eval_cfg["name"],
        "data": data_cfg["name"],
        "checkpoint": checkpoint,
        "encoder": encoder_config or {},
        "rows": rows,
        "published": published,
        "config": {"eval": eval_cfg, "eval_data": data_cfg, "seed": seed},
    }
    curves = {
        r["encoder"]: r["details"]["label_efficiency"] for r in rows if "label_efficiency" in r["details"]
    }
    if curves and isinstance(data, ClassificationData):
        for metric in ("accuracy", "auroc"):
            label_efficiency_plot(
                curves, metric, out / f"label_efficiency_{metric}.png", f"{data.name}: {eval_cfg['name']}"
            )
    if fine_tunes := finetune_curves(rows):  # rows whose details hold a fine-tune grid with val histories
        metric = eval_cfg.get("select_metric", "auroc")
        finetune_curves_plot({f"{data_cfg['name']}: fine-tune grid": fine_tunes}, metric, out / f"finetune_val_{metric}.png")
    write_results(results, out)
    return results


def evaluate_checkpoint(
    checkpoint: str | Path,
    eval_cfg: dict[str, Any],
    data_cfg: dict[str, Any],
    out_dir: str | Path,
    *,
    baseline: bool = True,
    device: str = "cpu",
    cache_dir: str | Path | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """:func:`evaluate` for an export/run folder; the baseline is :func:`random_init_like` it."""
    from ssl_med.export import load_pretrained

    resolved = resolve_eval_data(data_cfg)
    published_rows(resolved)  # a bad task / path fails here, before the encoder loads
    check_channel_request(eval_cfg, resolved)  # as does a channel the data does not name
    encoder_dir = resolve_encoder_dir(checkpoint)
    config = json.loads((encoder_dir / CONFIG_NAME).read_text())
    encoder_config = {k: config.get(k) for k in ("backbone", "objective", "data")}
    # sizes left null go to the encoder's input size (evaluate() does the same; resolving first
    # would have filled them with the file's own default size)
    eval_cfg, data_cfg = match_encoder(eval_cfg, data_cfg, encoder_config)
    return evaluate(
        load_pretrained(encoder_dir),
        eval_cfg,
        data_cfg,
        out_dir,
        baseline=random_init_like(encoder_dir, seed) if baseline else None,
        checkpoint=str(encoder_dir),
        encoder_config=encoder_config,
        device=device,
        cache_dir=cache_dir,
        seed=seed,
    )
