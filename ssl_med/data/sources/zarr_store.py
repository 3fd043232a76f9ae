"""An existing ssl_med image store (``data.source=store data.store=PATH``), e.g. from ``ssl_med ingest``."""

from __future__ import annotations

from ssl_med.registry import SOURCES


@SOURCES.register("store")
def existing_store(store: str, spatial_dims: int = 2) -> str:
    """Return ``store`` (a local path or fsspec URL) after checking it opens."""
    from ssl_med.data.store import ImageStore

    if len(ImageStore(store)) == 0:
        raise ValueError(f"image store {store} is empty")
    return store
