"""The model card (``README.md`` with Hugging Face metadata) and the evaluation tables an export
carries: evaluator results found in the run folder, rendered as markdown."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ssl_med.weights import CONFIG_NAME, WEIGHTS_NAME

log = logging.getLogger(__name__)

CARD_NAME = "README.md"
RESULTS_FILES = ("results.json", "eval_results.json")


def find_results(run_dir: Path | None, max_depth: int = 3) -> list[tuple[Path, Any, str | None]]:
    """Evaluator results in a run folder: ``(json path, parsed JSON, markdown table or None)`` per file."""
    if run_dir is None:
        return []
    skip = {"checkpoints", "tensorboard", "encoder", ".hydra"}
    found = []
    for path in sorted(run_dir.rglob("*.json")):
        rel = path.relative_to(run_dir)
        if path.name not in RESULTS_FILES or len(rel.parts) > max_depth or skip & set(rel.parts[:-1]):
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as err:
            log.warning("skipping unreadable results file %s: %s", path, err)
            continue
        markdown = next(
            (m.read_text() for m in (path.with_suffix(".md"), path.parent / "results.md") if m.is_file()),
            None,
        )
        found.append((path, data, markdown))
    return found


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if math.isfinite(value) else str(value)
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, float) for v in value):
        return f"{value[0]:.4f} ± {value[1]:.4f}"  # (mean, std)
    if isinstance(value, (dict, list)):
        return json.dumps(value, default=str)
    return str(value).replace("|", "\\|")


def results_table(data: Any) -> str:
    """A markdown table from evaluator results: a list of row dicts, ``{"rows"/"results": [...]}``,
    ``{task: {metric: value}}`` or a flat ``{metric: value}``."""
    rows: list[dict[str, Any]]
    if isinstance(data, dict):
        for key in ("rows", "results", "table"):
            if isinstance(data.get(key), list):
                data = data[key]
                break
    if isinstance(data, list) and all(isinstance(r, dict) for r in data):
        rows = data
    elif isinstance(data, dict) and data and all(isinstance(v, dict) for v in data.values()):
        rows = [{"task": name, **metrics} for name, metrics in data.items()]
    elif isinstance(data, dict):
        rows = [{"metric": k, "value": v} for k, v in data.items()]
    else:
        return ""
    if not rows:
        return ""
    columns: list[str] = []
    for row in rows:
        columns += [c for c in row if c not in columns]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_fmt(row.get(c, "")) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------
# model card
# --------------------------------------------------------------------------------------------------
def _yaml_list(name: str, items: Sequence[str]) -> list[str]:
    return [f"{name}:", *(f"  - {json.dumps(str(i))}" for i in items)] if items else []


def _front_matter(config: Mapping[str, Any], license: str, datasets: Sequence[str]) -> list[str]:
    """The card's YAML front matter (library, license, pipeline tag, tags, datasets)."""
    backbone, enc = config["backbone"], config["encoder"]
    obj_name = (config.get("objective") or {}).get("name", "unknown")
    tags = [
        "ssl_med",
        "medical-imaging",
        "self-supervised",
        "image-feature-extraction",
        backbone["name"],
        obj_name,
        f"{enc['spatial_dims']}d",
    ]
    if _timm_native(config):
        tags.append("timm")
    return [
        "---",
        "library_name: ssl_med",
        f"license: {license}",
        "pipeline_tag: image-feature-extraction",
        *_yaml_list("tags", tags),
        *_yaml_list("datasets", datasets),
        "---",
    ]


def _timm_native(config: Mapping[str, Any]) -> bool:
    """Whether the architecture is timm's own (not an ``ssl_med_*`` one that ssl_med registers)."""
    return not str(config["architecture"]).startswith("ssl_med_")


def _usage(config: Mapping[str, Any], repo_id: str | None) -> list[str]:
    """The 'Usage' section: loading with ssl_med and with timm, on an example input of the right shape."""
    enc, prep = config["encoder"], config["preprocessing"]
    ref = f"hf-hub:{repo_id}" if repo_id else "path/to/this/folder"
    size = enc["img_size"] or prep.get("crop_size")
    example = [2, enc["in_chans"] or 1, *(size or [s * 4 for s in enc["patch_size"]])]
    usage = [
        "```python",
        "import torch",
        "import ssl_med",
        "",
        f'encoder = ssl_med.load_pretrained("{ref}")  # rebuilds the network from config.json, checks sha256',
        f"x = torch.rand({', '.join(map(str, example))})  # inputs scaled to [0, 1], see 'Inputs and outputs'",
        "out = encoder(x)",
        "out.pooled        # (B, D) image embedding",
        "out.patch_tokens  # (B, N, D) patch tokens on out.grid",
        f"encoder(x, return_layers={enc['hidden_state_layers']}).hidden_states  # for UNETR-style decoders",
        "```",
        "",
        "With timm:",
        "",
        "```python",
        "import timm",
    ]
    timm_ref = f"hf-hub:{repo_id}" if repo_id else "local-dir:path/to/this/folder"
    if _timm_native(config):
        usage += [
            f'model = timm.create_model("{timm_ref}", pretrained=True)  # timm\'s own {config["architecture"]}',
            "features = model.forward_features(x)  # (B, 1 + N, D), same tokens as ssl_med",
        ]
    else:
        usage += [
            "# needs `pip install ssl_med`: it registers its backbones with timm when timm is imported",
            f'model = timm.create_model("{timm_ref}", pretrained=True)  # {config["architecture"]}',
            "model(x)                   # (B, D) pooled features, = ssl_med's encoder(x).pooled",
            "model.forward_features(x)  # (B, P + N, D) tokens; model.reset_classifier(n) adds a head",
        ]
    usage.append("```")
    return usage


def _io_rows(config: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Rows of the 'Inputs and outputs' table: input shape, intensity, spacing, crop, channels, outputs."""
    enc, prep = config["encoder"], config["preprocessing"]
    chans = enc["in_chans"] if enc["in_chans"] is not None else "any (channel-adaptive)"
    shape_axes = "(B, C, D, H, W)" if enc["spatial_dims"] == 3 else "(B, C, H, W)"
    spacing = prep["spacing"].get("note", "")
    if "median_mm" in prep["spacing"]:
        spacing += f"; pretraining median {prep['spacing']['median_mm']} mm"
    return [
        (
            "input",
            f"`{shape_axes}` float32, C = {chans}, spatial size a multiple of the patch {enc['patch_size']}",
        ),
        (
            "intensity",
            f"{prep['intensity_normalisation']['formula']} ({prep['intensity_normalisation']['scope']})",
        ),
        ("spacing", spacing),
        ("pretraining crop", str(prep.get("crop_size"))),
        ("channels", prep["channel_handling"]),
        ("output `pooled`", f"`(B, {enc['embed_dim']})`, pooling = {enc['pooling']}"),
        ("output `patch_tokens`", f"`(B, N, {enc['embed_dim']})`, N = number of patches"),
    ]


def _evaluation(results: Sequence[tuple[Path, Any, str | None]]) -> list[str]:
    """The 'Evaluation' section: one table per results file (its markdown, or one built from its data)."""
    evaluation: list[str] = []
    for path, data, markdown in results:
        table = markdown.strip() if markdown else results_table(data)
        if table:
            evaluation += [f"From `{path.name}` ({path.parent.name}):", "", table, ""]
    return evaluation or ["No evaluation results were found next to the pretraining run.", ""]


def _license_lines(license: str) -> list[str]:
    """The card's licence section; an unknown licence says how to set one."""
    if license != "unknown":
        return [f"`{license}`. The terms of the pretraining data apply as well."]
    return [
        "**Not set** (`license: unknown`). Set it when exporting, `ssl_med export ... license=<id>` "
        "(a Hugging Face / SPDX id such as `apache-2.0` or `cc-by-nc-4.0`, compatible with the pretraining "
        "data's terms), or record the data's licence when pretraining, `data.license=<id>`, which exports "
        "then default to.",
    ]


def write_model_card(
    out: Path,
    config: Mapping[str, Any],
    *,
    license: str = "unknown",
    datasets: Sequence[str] | None = None,
    repo_id: str | None = None,
    results: Sequence[tuple[Path, Any, str | None]] = (),
) -> Path:
    """README.md with YAML front matter (library, tags, license, datasets), usage, I/O, training, evaluation."""
    backbone, enc = config["backbone"], config["encoder"]
    objective, data = config.get("objective") or {}, config.get("data") or {}
    dims = enc["spatial_dims"]
    obj_name = objective.get("name", "unknown")
    name = repo_id or f"ssl_med-{backbone['name']}-{obj_name}-{dims}d"
    datasets = list(datasets or ([str(data["name"])] if data.get("name") else []))
    lines = [
        *_front_matter(config, license, datasets),
        "",
        f"# {name}",
        "",
        f"A {dims}D **{backbone['name']}** encoder ({enc['num_parameters']:,} parameters, width {enc['embed_dim']}, "
        f"depth {enc['depth']}, patch {enc['patch_size']}) pretrained self-supervised with **{obj_name}** on "
        f"`{data.get('name', 'unknown')}` data using ssl_med {config['ssl_med_version']}. "
        "Encoder weights only: no objective heads, no classifier.",
        "",
        "## Intended use",
        "",
        "Feature extraction and fine-tuning for medical image analysis research: linear probes / kNN on "
        "`pooled`, segmentation decoders on `patch_tokens` and hidden states. **Not for clinical use**: it "
        "has not been validated for diagnosis, and it inherits the biases of its pretraining data.",
        "",
        "## License",
        "",
        *_license_lines(license),
        "",
        "## Usage",
        "",
        *_usage(config, repo_id),
        "",
        "## Inputs and outputs",
        "",
        "| | |",
        "|---|---|",
        *(f"| {k} | {v} |" for k, v in _io_rows(config)),
        "",
        "## Training",
        "",
        f"- objective: `{json.dumps(objective, default=str)}`",
        f"- data: `{json.dumps(data, default=str)}`",
        f"- backbone: `{json.dumps(backbone, default=str)}`",
        f"- exported weights: {config.get('exported_weights', 'student')}",
        "",
        "## Evaluation",
        "",
        *_evaluation(results),
        "## Files",
        "",
        f"- `{WEIGHTS_NAME}`: sha256 `{(config.get('weights') or {}).get('sha256', '')}` (checked by `load_pretrained`)",
        f"- `{CONFIG_NAME}`: backbone constructor arguments, preprocessing, pretraining objective and data, timm fields",
        "",
    ]
    card = out / CARD_NAME
    card.write_text("\n".join(lines))
    return card
