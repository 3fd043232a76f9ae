"""Every runtime dependency in pyproject.toml is used by the package: imported (or its package data
read) somewhere in ``ssl_med``, ``backbones`` or ``objectives``; a dependency nothing uses fails here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
#: distribution name -> import name, where they differ
IMPORT_NAMES = {"scikit-image": "skimage", "scikit-learn": "sklearn", "pillow": "PIL", "hydra-core": "hydra"}
#: declared without being imported, and why
NOT_IMPORTED = {"torchvision": "timm's dependency, bounded here so pip pairs it with the torch range"}


def declared() -> list[str]:
    tomllib = pytest.importorskip("tomllib")
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    return [re.split(r"[<>=!~\[; ]", d, maxsplit=1)[0] for d in deps]


def test_every_dependency_is_used() -> None:
    sources = "\n".join(
        p.read_text(encoding="utf-8") for pkg in ("ssl_med", "backbones", "objectives") for p in (ROOT / pkg).rglob("*.py")
    )
    unused = []
    for dist in declared():
        if dist in NOT_IMPORTED:
            continue
        module = IMPORT_NAMES.get(dist, dist.replace("-", "_"))
        pattern = rf"^\s*(import|from)\s+{module}\b|[\"']{module}[\"'.]"
        if not re.search(pattern, sources, flags=re.MULTILINE):
            unused.append(dist)
    assert not unused, f"declared in pyproject.toml but never used: {unused}"
