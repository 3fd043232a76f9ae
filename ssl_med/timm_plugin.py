"""Registers ssl_med's backbones with timm when timm is imported, so exports load with timm alone.

timm resolves ``timm.create_model("local-dir:DIR")`` / ``("hf-hub:ORG/NAME")`` by the ``architecture``
in the export's ``config.json`` and looks that name up in its own registry; it has no plugin or
entry-point mechanism, so ``ssl_med_vit``, ``ssl_med_mamba``, ... must be registered before the call.
The package therefore installs ``ssl_med-timm.pth`` next to itself in ``site-packages``; Python runs
its one line, :func:`install`, at start-up. That is all that happens at start-up: a finder is put at
the front of ``sys.meta_path`` and compares each imported name with ``"timm"``. When ``timm`` itself
is imported, the finder removes itself, lets timm import normally and then registers one small
function per backbone (:data:`BUILTIN_BACKBONES` and the ``ssl_med.backbones`` entry points). Those
functions import :mod:`ssl_med.hub` (and torch, the backbones) only when timm calls one of them.

``SSL_MED_TIMM_PLUGIN=0`` turns the hook off; ``import ssl_med.hub`` registers the same names by hand.
This module and :mod:`ssl_med.timm_entrypoints` (the entry points, shared with :mod:`ssl_med.hub`) import
nothing beyond the standard library at start-up.
"""

from __future__ import annotations

import os
import sys
from typing import Any

from ssl_med.timm_entrypoints import register_timm_entrypoints

#: the backbones in the ``backbones`` package (checked against ``BACKBONES`` by the tests)
BUILTIN_BACKBONES = ("chada_vit", "mamba", "vit", "xlstm")
ENTRY_POINT_GROUP = "ssl_med.backbones"
DISABLE_ENV = "SSL_MED_TIMM_PLUGIN"


def backbone_names() -> list[str]:
    """The built-in backbones and the names of ``ssl_med.backbones`` entry points (plugins)."""
    from importlib.metadata import entry_points

    plugins = [ep.name for ep in entry_points(group=ENTRY_POINT_GROUP)]
    return sorted({*BUILTIN_BACKBONES, *plugins})


def _create_lazily(backbone: str, **kwargs: Any) -> Any:
    from ssl_med.hub import create_timm_model

    return create_timm_model(backbone, **kwargs)


def register() -> list[str]:
    """Register ``ssl_med_<backbone>`` with timm for every backbone timm does not know yet; returns them."""
    return register_timm_entrypoints(backbone_names(), _create_lazily, sys.modules[__name__])


class _RegisterAfterImport:
    """Loader wrapper: runs timm's own loader, then :func:`register`, then puts the original back."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: Any) -> None:
        module.__loader__ = module.__spec__.loader = self.loader
        self.loader.exec_module(module)
        try:
            register()
        except Exception as err:  # never break `import timm`
            import warnings

            warnings.warn(f"ssl_med could not register its backbones with timm: {err!r}", stacklevel=2)


class TimmImportHook:
    """A ``sys.meta_path`` finder that answers only for ``timm``, once (see the module docstring)."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != "timm":
            return None
        uninstall()
        from importlib.util import find_spec

        spec = find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _RegisterAfterImport(spec.loader)
        return spec


def install() -> None:
    """Register with timm now if it is imported, else when it is (the ``.pth`` file calls this)."""
    if os.environ.get(DISABLE_ENV, "1").strip().lower() in ("0", "false", "no", "off"):
        return
    if "timm" in sys.modules:
        register()
    elif not any(isinstance(finder, TimmImportHook) for finder in sys.meta_path):
        sys.meta_path.insert(0, TimmImportHook())


def uninstall() -> None:
    """Remove the import hook (registrations already made stay)."""
    sys.meta_path[:] = [finder for finder in sys.meta_path if not isinstance(finder, TimmImportHook)]
