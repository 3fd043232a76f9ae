"""The ``ssl_med`` command line: ``ssl_med <command> [hydra overrides]``.

Commands are discovered from the modules of :mod:`ssl_med.commands` (one module per command), so a
new command is one new file there.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

import ssl_med.commands as commands_package
from ssl_med.commands import Command

# commands shown first, in this order; others follow alphabetically
ORDER = ("pretrain", "evaluate", "ingest", "export", "report", "list")


def discover_commands() -> dict[str, Command]:
    found = {}
    for module in pkgutil.iter_modules(commands_package.__path__):
        found[module.name] = importlib.import_module(f"ssl_med.commands.{module.name}").COMMAND
    ranked = sorted(found, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))
    return {name: found[name] for name in ranked}


def usage(commands: dict[str, Command]) -> str:
    width = max(len(name) for name in commands)
    lines = [
        "usage: ssl_med <command> [overrides...]",
        "",
        "Self-supervised pretraining of medical imaging encoders (2D/3D, any backbone x any objective).",
        "",
        "commands:",
        *(f"  {name:<{width}}  {cmd.help}" for name, cmd in commands.items()),
        "",
        "pretrain, evaluate and export take Hydra overrides (key=value); ingest takes paths and flags.",
        "`ssl_med <command> --help` explains each. Examples:",
        "  ssl_med pretrain                                    # ViT + MAE on the embedded 2D demo data",
        "  ssl_med pretrain backbone=vit objective=mae data=demo3d trainer.max_steps=100",
        "  ssl_med pretrain -m optim.lr=1e-4,3e-4              # a sweep (one run folder per point)",
        "  ssl_med ingest /data/ct --out ct.zarr               # NIfTI/DICOM/PNG/TIFF/MedMNIST -> Zarr store",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    commands = discover_commands()
    if not args or args[0] in ("-h", "--help", "help"):
        print(usage(commands))
        return 0
    name, rest = args[0], args[1:]
    if name not in commands:
        print(f"ssl_med: unknown command {name!r}; choose one of: {', '.join(commands)}\n", file=sys.stderr)
        print(usage(commands), file=sys.stderr)
        return 2
    return commands[name].run(rest)


if __name__ == "__main__":
    sys.exit(main())
