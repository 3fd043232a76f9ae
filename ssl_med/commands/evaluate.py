"""``ssl_med evaluate [overrides]``: evaluate an exported encoder on labelled data (config ``conf/evaluate.yaml``)."""

from __future__ import annotations

from omegaconf import DictConfig, OmegaConf

from ssl_med.commands import Command, apply_num_threads, run_hydra
from ssl_med.evaluators import medmnist  # noqa: F401  (registers ${ssl_med.stem:...}, used by eval_data=medmnist)


def _task(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    from ssl_med.evaluators.api import evaluate_checkpoint

    apply_num_threads(cfg)
    out_dir = HydraConfig.get().runtime.output_dir
    evaluate_checkpoint(
        cfg.checkpoint,
        OmegaConf.to_container(cfg.eval, resolve=True),  # type: ignore[arg-type]
        OmegaConf.to_container(cfg.eval_data, resolve=True),  # type: ignore[arg-type]
        out_dir,
        baseline=bool(cfg.baseline),
        device=cfg.device,
        cache_dir=cfg.cache_dir,
        seed=int(cfg.seed),
    )
    print(f"results written to {out_dir}/results.md")


COMMAND = Command(
    help="evaluate an encoder: eval=linear_probe|knn|finetune|segmentation checkpoint=DIR "
    "eval_data=breastmnist|pneumoniamnist|...|medmnist eval_data.path=FILE.npz",
    run=lambda args: run_hydra("evaluate", "ssl_med evaluate", _task, args),
)
