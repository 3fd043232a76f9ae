"""``ssl_med export checkpoint=… out=DIR [push_to=ORG/NAME]``: a hub-ready encoder folder (config ``conf/export.yaml``)."""

from __future__ import annotations

import sys

from omegaconf import DictConfig, OmegaConf

from ssl_med.commands import Command, run_hydra


class ExportFailed(SystemExit):
    """Ends the command with exit code 1 after printing a one-line reason (no traceback)."""


def _task(cfg: DictConfig) -> None:
    from ssl_med.export import ExportError, ExportTargetError, HubError, UnsafeWeightsError, export_encoder

    datasets = OmegaConf.to_container(cfg.datasets) if cfg.datasets else None
    try:
        out = export_encoder(
            cfg.checkpoint,
            cfg.out,
            weights=cfg.weights,
            license=cfg.license,
            datasets=[str(d) for d in datasets] if isinstance(datasets, list) else None,
            push_to=cfg.push_to,
            private=cfg.private,
            trust_pickle=cfg.trust_pickle,
            overwrite=cfg.overwrite,
            format=cfg.format,
        )
    except HubError as err:
        print(f"ssl_med export: upload failed: {err}", file=sys.stderr)
        raise ExportFailed(1) from err
    except (ExportError, ExportTargetError, UnsafeWeightsError, FileNotFoundError) as err:
        print(f"ssl_med export: {err}", file=sys.stderr)
        raise ExportFailed(1) from err
    what = "MONAI bundle" if cfg.format == "monai_bundle" else "encoder"
    print(f"{what} exported to {out}" + (f" and pushed to {cfg.push_to}" if cfg.push_to else ""))


def _run(args: list[str]) -> int:
    try:
        return run_hydra("export", "ssl_med export", _task, args)
    except ExportFailed as failed:
        return int(failed.code or 1)


COMMAND = Command(
    help="write an encoder as a hub-ready folder (safetensors + config + model card); push_to=ORG/NAME uploads it",
    run=_run,
)
