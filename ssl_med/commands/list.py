"""``ssl_med list``: the registered backbones, objectives, evaluators and data sources."""

from __future__ import annotations

from ssl_med.commands import Command


def _run(args: list[str]) -> int:
    from ssl_med.registry import REGISTRIES

    for kind, registry in REGISTRIES.items():
        print(f"{kind}: {', '.join(registry.names()) or '(none)'}")
    return 0


COMMAND = Command(help="registered backbones, objectives, evaluators and data sources", run=_run)
