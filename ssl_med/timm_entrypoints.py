"""The ``ssl_med_<backbone>`` functions that ``timm.create_model`` looks up, and their registration.

Two callers register them: :mod:`ssl_med.timm_plugin` when timm is imported (with a ``create`` that
imports :mod:`ssl_med.hub` only when timm calls it) and :mod:`ssl_med.hub` on import (with
:func:`ssl_med.hub.create_timm_model` itself). This module imports nothing beyond the standard
library, so neither caller imports the other through it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from types import ModuleType
from typing import Any

TIMM_PREFIX = "ssl_med_"

#: ``create(backbone, **timm_kwargs) -> model``: what every entry point calls
CreateFn = Callable[..., Any]


def timm_entrypoint(backbone: str, create: CreateFn, module: ModuleType) -> Callable[..., Any]:
    """The entry point ``ssl_med_<backbone>(**kwargs)`` = ``create(backbone, **kwargs)``, attached to ``module``."""

    def entrypoint(**kwargs: Any) -> Any:
        return create(backbone, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = TIMM_PREFIX + backbone
    entrypoint.__module__ = module.__name__
    entrypoint.__doc__ = f"ssl_med backbone {backbone!r} for timm.create_model (see ssl_med.hub.create_timm_model)."
    setattr(module, entrypoint.__name__, entrypoint)  # timm's register_model reads it from its module
    return entrypoint


def register_timm_entrypoints(backbones: Iterable[str], create: CreateFn, module: ModuleType) -> list[str]:
    """Register ``ssl_med_<backbone>`` with timm for each backbone timm does not know yet; returns those added."""
    from timm.models import is_model, register_model

    added = []
    for backbone in backbones:
        name = TIMM_PREFIX + backbone
        if not is_model(name):
            register_model(timm_entrypoint(backbone, create, module))
            added.append(name)
    return added
