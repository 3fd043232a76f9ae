"""ssl_med: self-supervised pretraining for medical foundation encoders (2D/3D, any backbone x objective)."""

from __future__ import annotations

from ssl_med.version import __version__

__all__ = ["__version__", "load_pretrained"]


def __getattr__(name: str):  # keep `import ssl_med` light: torch is imported on first use
    if name == "load_pretrained":
        from ssl_med.export import load_pretrained

        return load_pretrained
    raise AttributeError(f"module 'ssl_med' has no attribute {name!r}")
