"""What a sweep varied: each run's Hydra overrides, the keys that differ between runs, and ordering.

Hydra writes the command-line overrides of every run (one job of a multirun, or a single run) to
``<run dir>/.hydra/overrides.yaml``. A result file (``results.json``, ``online_eval.json``) belongs to
the Hydra run folders above it, up to the folder being summarised; :func:`run_overrides` merges
their overrides (the nearest folder wins), and :func:`swept_keys` keeps those whose values differ
between the runs found, so a summary of ``ssl_med pretrain -m optim.lr=1e-4,3e-4 objective=mae,dino``
gets an ``optim.lr`` and an ``objective`` column, and nothing for the overrides all runs share.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

OVERRIDES_FILE = Path(".hydra") / "overrides.yaml"


def parse_overrides(lines: Iterable[str]) -> dict[str, Any]:
    """``{key: value}`` of Hydra override strings (``optim.lr=3e-4``, ``+logger=csv``, ``backbone=vit``):
    numbers stay numbers, everything else is the value as written; deletions (``~key``) are left out."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    parser = OverridesParser.create()
    out: dict[str, Any] = {}
    for line in lines:
        try:
            (override,) = parser.parse_overrides([str(line)])
        except Exception:  # not Hydra's grammar (edited by hand): keep the text
            key, _, value = str(line).partition("=")
            out[key.lstrip("+~")] = value
            continue
        if override.is_delete():
            continue
        key = override.key_or_group + (f"@{override.package}" if override.package else "")
        value = override.value()
        numeric = isinstance(value, int | float) and not isinstance(value, bool)
        out[key] = value if numeric else override.get_value_element_as_str()
    return out


def run_overrides(path: Path, root: Path) -> dict[str, Any]:
    """The overrides of the Hydra run folders from ``root`` down to ``path``'s folder, merged (the
    nearest wins); ``{}`` when none of them has a ``.hydra/overrides.yaml``."""
    from omegaconf import OmegaConf

    folder = path.parent.resolve()
    root = root.resolve()
    chain = [folder, *folder.parents]
    chain = list(reversed(chain[: chain.index(root) + 1])) if root in chain else [folder]
    merged: dict[str, Any] = {}
    for run_dir in chain:
        file = run_dir / OVERRIDES_FILE
        if file.is_file():
            merged.update(parse_overrides(OmegaConf.to_container(OmegaConf.load(file)) or []))
    return merged


#: overrides that say where a run is kept or what it is called, not how it was trained: a new value in
#: every run, which the ``run`` column of a summary already shows (``hydra.run.dir``, ``experiment``)
BOOKKEEPING_KEYS = ("hydra.", "experiment")


def swept_keys(overrides: Iterable[Mapping[str, Any]], only: Iterable[str] | None = None) -> list[str]:
    """The keys whose value differs between the runs (a key missing from a run counts as a value of
    its own), in order of first appearance and without :data:`BOOKKEEPING_KEYS`; or those of ``only`` that
    differ, in its order."""
    runs = list(overrides)
    keys: list[str] = []
    for run in runs:
        keys += [k for k in run if k not in keys]
    if only is not None:  # in the order asked for
        keys = [k for k in dict.fromkeys(only) if k in keys]
    else:
        keys = [k for k in keys if not any(k == b or (b.endswith(".") and k.startswith(b)) for b in BOOKKEEPING_KEYS)]
    return [k for k in keys if len({repr(run.get(k)) for run in runs}) > 1]


def is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def numeric_keys(rows: Iterable[Mapping[str, Any]], keys: Iterable[str]) -> list[str]:
    """The ``keys`` whose every present value in ``rows`` is a finite number."""
    rows = list(rows)
    return [k for k in keys if all(is_number(r[k]) for r in rows if k in r) and any(k in r for r in rows)]


def by_metric(metric: str) -> Any:
    """Sort key: higher ``metric`` first, rows without a number for it last."""

    def key(row: Mapping[str, Any]) -> tuple[bool, float]:
        value = row.get(metric)
        return (not is_number(value), -value if is_number(value) else 0.0)

    return key
