"""The ``ssl_med`` command line: ``ssl_med <command> [hydra overrides]``.

Commands are a table (:data:`COMMANDS`) so later features plug in by adding one entry.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass

CONFIG_PACKAGE = "pkg://ssl_med.conf"


@dataclass(frozen=True)
class Command:
    help: str
    run: Callable[[list[str]], int]


def _run_hydra(config_name: str, prog: str, task: Callable, args: list[str]) -> int:
    """Run ``task(cfg)`` as a Hydra app (overrides, ``-m`` multirun, ``--help``, ``--cfg job``)."""
    import hydra

    saved = sys.argv
    sys.argv = [prog, *args]
    try:
        hydra.main(version_base="1.3", config_path=CONFIG_PACKAGE, config_name=config_name)(task)()
    finally:
        sys.argv = saved
    return 0


def _pretrain_task(cfg) -> None:
    import logging

    from hydra.core.hydra_config import HydraConfig

    logging.getLogger("lightning.pytorch").propagate = False  # Lightning prints its own; avoid doubles

    from ssl_med.config import parse_pretrain_config
    from ssl_med.train.run import pretrain

    out = pretrain(parse_pretrain_config(cfg), HydraConfig.get().runtime.output_dir)
    print(f"encoder written to {out}")


def pretrain_command(args: list[str]) -> int:
    return _run_hydra("pretrain", "ssl_med pretrain", _pretrain_task, args)


def list_command(args: list[str]) -> int:
    from ssl_med.registry import REGISTRIES

    for kind, registry in REGISTRIES.items():
        print(f"{kind}: {', '.join(registry.names()) or '(none)'}")
    return 0


COMMANDS: dict[str, Command] = {
    "pretrain": Command(
        "self-supervised pretraining; Hydra overrides, e.g. backbone=vit objective=mae data=demo3d, -m for sweeps",
        pretrain_command,
    ),
    "list": Command("registered backbones, objectives, evaluators and data sources", list_command),
}


def usage() -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [
        "usage: ssl_med <command> [overrides...]",
        "",
        "Self-supervised pretraining of medical imaging encoders (2D/3D, any backbone x any objective).",
        "",
        "commands:",
        *(f"  {name:<{width}}  {cmd.help}" for name, cmd in COMMANDS.items()),
        "",
        "Each command takes Hydra overrides (key=value); `ssl_med <command> --help` lists its config",
        "groups and defaults. Examples:",
        "  ssl_med pretrain                                    # ViT + MAE on the embedded 2D demo data",
        "  ssl_med pretrain backbone=vit objective=mae data=demo3d trainer.max_steps=100",
        "  ssl_med pretrain -m optim.lr=1e-4,3e-4              # a sweep (one run folder per point)",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        print(f"ssl_med: unknown command {name!r}; choose one of: {', '.join(COMMANDS)}\n", file=sys.stderr)
        print(usage(), file=sys.stderr)
        return 2
    return COMMANDS[name].run(rest)


if __name__ == "__main__":
    sys.exit(main())
