"""Name -> constructor registries for backbones, objectives, evaluators and pretraining data sources.

Every pluggable component is registered by name with a decorator, so ``backbone=NAME`` in a Hydra
config resolves through one mechanism::

    from ssl_med.registry import BACKBONES

    @BACKBONES.register("vit")
    class VisionTransformer(Encoder): ...

    encoder = BACKBONES.build("vit", spatial_dims=3, in_chans=1)

The built-in modules live in the top-level packages ``backbones/`` and ``objectives/`` (and
``ssl_med.evaluators``, ``ssl_med.data.sources``); they are imported lazily the first time a
registry is queried. Third-party packages add more through entry points in their
``pyproject.toml``::

    [project.entry-points."ssl_med.backbones"]
    my_net = "my_pkg.my_net"     # the module registers itself on import
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class RegistryError(KeyError):
    """An unknown name, a duplicate registration or bad constructor arguments."""

    def __str__(self) -> str:  # KeyError quotes its message; show it plainly
        return str(self.args[0]) if self.args else ""


class Registry(Generic[T]):
    """A named collection of constructors of one kind.

    Args:
        kind: what the registry holds, used in messages (``"backbone"``).
        builtin_packages: packages whose modules are imported on first lookup so that their
            ``@register`` decorators run.
        entry_point_group: the ``importlib.metadata`` entry-point group for third-party plugins.
    """

    def __init__(self, kind: str, builtin_packages: tuple[str, ...], entry_point_group: str) -> None:
        self.kind = kind
        self._builtin_packages = builtin_packages
        self._entry_point_group = entry_point_group
        self._items: dict[str, Callable[..., T]] = {}
        self._loaded = False

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        """Decorator registering a class or factory function under ``name``."""

        def decorator(obj: Callable[..., T]) -> Callable[..., T]:
            existing = self._items.get(name)
            if existing is not None and existing is not obj:
                raise RegistryError(f"{self.kind} {name!r} is already registered by {existing!r}")
            self._items[name] = obj
            return obj

        return decorator

    def _load(self) -> None:
        if self._loaded:
            return
        self._loaded = True
        for package_name in self._builtin_packages:
            package = importlib.import_module(package_name)
            for module in pkgutil.iter_modules(package.__path__):
                if not module.name.startswith("_"):
                    importlib.import_module(f"{package_name}.{module.name}")
        for entry_point in entry_points(group=self._entry_point_group):
            entry_point.load()

    def names(self) -> list[str]:
        """Sorted registered names (built-ins and plugins)."""
        self._load()
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def get(self, name: str) -> Callable[..., T]:
        """The constructor registered under ``name``; unknown names list the valid choices."""
        self._load()
        if name not in self._items:
            raise RegistryError(f"unknown {self.kind} {name!r}; choose one of: {', '.join(self.names())}")
        return self._items[name]

    def build(self, name: str, **kwargs: Any) -> T:
        """Construct ``name`` with ``kwargs``; unknown arguments are reported with the valid ones."""
        constructor = self.get(name)
        signature = inspect.signature(constructor)
        accepts_var_kw = any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())
        if not accepts_var_kw:
            valid = [p for p in signature.parameters if p != "self"]
            unknown = sorted(set(kwargs) - set(valid))
            if unknown:
                raise RegistryError(
                    f"{self.kind} {name!r} got unknown option(s) {unknown}; valid options: {', '.join(valid)}"
                )
        return constructor(**kwargs)


BACKBONES: Registry[Any] = Registry("backbone", ("backbones",), "ssl_med.backbones")
OBJECTIVES: Registry[Any] = Registry("objective", ("objectives",), "ssl_med.objectives")
EVALUATORS: Registry[Any] = Registry("evaluator", ("ssl_med.evaluators",), "ssl_med.evaluators")
#: where pretraining images come from (``data.source``: ``demo``, ``store``), each resolving to an image
#: store; not the evaluators' labelled ``eval_data`` sets. Plugins keep the ``ssl_med.datasets`` group.
SOURCES: Registry[Any] = Registry("data source", ("ssl_med.data.sources",), "ssl_med.datasets")
DATASETS = SOURCES  # the earlier name, kept for plugins and scripts

REGISTRIES: dict[str, Registry[Any]] = {
    "backbones": BACKBONES,
    "objectives": OBJECTIVES,
    "evaluators": EVALUATORS,
    "sources": SOURCES,
}
