"""Pre-flight checks of ``ssl_med export``: where the folder goes and where it is pushed, before anything is written.

An export writes five files into ``out`` (:data:`ssl_med.hub.EXPORT_FILES`). Writing them into a folder
that holds other things (``out=.`` in a project, a repository with its own ``README.md`` and
``config.json``) would replace that folder's files, so a non-empty folder is accepted only when it is a
previous ssl_med export (only export files, and a ``config.json`` that ssl_med wrote), or when the
caller passes ``overwrite=True``. A ``push_to`` name is checked at the same time, so that a bad name
fails before the export rather than after it.
"""

from __future__ import annotations

import json
from pathlib import Path

from ssl_med.hub import EXPORT_FILES, check_repo_id


class ExportTargetError(ValueError):
    """An export destination (``out`` folder or ``push_to`` name) that ssl_med will not write to."""


#: the top-level names of a MONAI bundle export (``format=monai_bundle``)
BUNDLE_FILES = ("configs", "models", "docs", "LICENSE")


def _is_previous_bundle(folder: Path, names: set[str]) -> bool:
    """Whether ``folder`` is a MONAI bundle that ssl_med exported (its metadata names ssl_med)."""
    try:
        meta = json.loads((folder / "configs" / "metadata.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return names <= set(BUNDLE_FILES) and isinstance(meta, dict) and "ssl_med" in meta.get("required_packages_version", {})


def _is_previous_export(folder: Path, names: set[str]) -> bool:
    """Whether ``folder`` (holding ``names``) looks like a folder ssl_med exported: export files only,
    with a ``config.json`` that records an ssl_med version and a backbone (or an ssl_med MONAI bundle)."""
    if "configs" in names:
        return _is_previous_bundle(folder, names)
    if not names <= set(EXPORT_FILES) or "config.json" not in names:
        return False
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    return (
        isinstance(config, dict) and "ssl_med_version" in config and isinstance(config.get("backbone"), dict)
    )


def check_export_target(out: str | Path, push_to: str | None = None, overwrite: bool = False) -> Path:
    """``out`` as a :class:`~pathlib.Path` after checking that an export may be written there and pushed.

    Args:
        out: the export folder; it may be missing, empty or a previous ssl_med export.
        push_to: a hub repository id ``ORG/NAME`` (or ``None``), checked with :func:`~ssl_med.hub.check_repo_id`.
        overwrite: accept a non-empty folder that is not an ssl_med export; its files of the export's
            names are replaced and its other files are left alone.

    Raises:
        ExportTargetError: a bad ``push_to``; ``out`` is a file; ``out`` is a foreign non-empty folder
            and ``overwrite`` is false.
    """
    if push_to:
        try:
            check_repo_id(push_to)
        except ValueError as err:
            raise ExportTargetError(f"push_to={push_to!r}: {err}") from None
    folder = Path(out)
    if folder.exists() and not folder.is_dir():
        raise ExportTargetError(f"out={out}: is a file, not a folder")
    names = {p.name for p in folder.iterdir()} if folder.is_dir() else set()
    if names and not overwrite and not _is_previous_export(folder, names):
        shown = ", ".join(sorted(names)[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
        raise ExportTargetError(
            f"out={out}: the folder is not empty and not an ssl_med export ({shown}); choose an empty or new "
            f"folder, or pass overwrite=true to write the export files ({', '.join(EXPORT_FILES)}) into it"
        )
    return folder
