"""``trainer=fsdp``: fully sharded data parallel with torch's FSDP2 (``fully_shard``) under Lightning.

Lightning runs FSDP2 through its ``ModelParallelStrategy``, whose documented recipe is to apply
``fully_shard`` in the module's ``configure_model`` hook; :class:`ShardedStrategy` is that strategy
with one data-parallel mesh dimension over every process (no tensor parallelism), and
:func:`shard_objective` is what ``configure_model`` applies:

* **wrap policy**: every instance of the encoder's declared block classes
  (:attr:`ssl_med.encoder.Encoder.block_classes`: ViT's ``Block``, Mamba's ``MambaBlock``, ...)
  becomes its own FSDP unit, wherever it sits in the objective (the student, an EMA teacher's copy, an
  MAE decoder built from the same blocks); the objective itself is the root unit (stems, tokens,
  final norms, heads), as Lightning's ``auto_wrap_policy={Block}`` wraps. A block's parameters are
  all-gathered just before it runs and freed after, so a rank holds its shard of everything, the
  root's parameters and one block at a time. (The encoders are not units of their own: FSDP2 then
  warns that their outputs are views, whose in-place use would skip the backward all-gather.)
* **mixed precision** (:data:`MIXED_PRECISION`): ``trainer.precision=bf16-mixed`` all-gathers and
  computes in bf16 and reduces gradients in float32 (torch's recommended ``MixedPrecisionPolicy``);
  the sharded parameters and the optimiser state stay float32. ``bf16-true`` stores bf16 and
  ``32-true`` runs float32. Lightning's ``ModelParallelStrategy`` has no ``16-mixed``.
* **activation checkpointing** (``trainer.activation_checkpointing=true``) is the encoder's own
  per-block recomputation (:meth:`~ssl_med.encoder.TokenEncoder.set_grad_checkpointing`), which runs
  inside the sharded blocks: the recomputation all-gathers the block again.
* **checkpoints** are sharded (``save_distributed_checkpoint=True``): ``last.ckpt`` is a folder with
  one file per rank written by ``torch.distributed.checkpoint`` plus Lightning's ``meta.pt``, and
  resumes on any number of processes; it is written to a temporary folder and renamed into place,
  as single-file checkpoints are; :func:`ssl_med.train.checkpoints.consolidate_checkpoint`
  turns one into an ordinary single-file checkpoint, ``ssl_med export checkpoint=<folder>
  trust_pickle=true`` exports its encoder on one process (:func:`ssl_med.weights.read_checkpoint_state`),
  and the run's ``encoder/`` export is an ordinary single-file encoder (:func:`full_encoder`).
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.tensor import DTensor

from ssl_med.build import build_encoder
from ssl_med.encoder import Encoder
from ssl_med.train.checkpoints import PARTIAL_SAVE

#: ``trainer.precision`` -> FSDP2's mixed-precision policy (parameters all-gathered / gradients reduced in)
MIXED_PRECISION: dict[str, MixedPrecisionPolicy] = {
    "32-true": MixedPrecisionPolicy(),
    "bf16-mixed": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32),
    "bf16-true": MixedPrecisionPolicy(),
}


class ShardedStrategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` as pure FSDP2: the data-parallel dimension spans every
    process of every node, the tensor-parallel one is 1; checkpoints are sharded."""

    def __init__(self) -> None:
        super().__init__(save_distributed_checkpoint=True)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        """Write the sharded checkpoint into a temporary folder beside ``filepath`` and move it into
        place once every rank has written its shard: a run killed mid-save leaves the previous
        checkpoint or none (then ``resume=auto`` takes the newest step checkpoint), never a folder of
        mixed shards; the next start removes the partial folder (:func:`remove_partial_saves`)."""
        path = Path(self.broadcast(str(filepath)))
        tmp = path.with_name(f".{path.name}{PARTIAL_SAVE}")
        if self.global_rank == 0 and tmp.exists():
            shutil.rmtree(tmp)
        self.barrier()
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier()
        if self.global_rank == 0:
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
            tmp.rename(path)
        self.barrier()

    def optimizer_state(self, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
        """The sharded optimiser state, with an entry for every trainable parameter (see
        :func:`complete_optimizer_state`)."""
        complete_optimizer_state(getattr(optimizer, "_optimizer", optimizer))  # Lightning's wrapper
        return super().optimizer_state(optimizer)


def complete_optimizer_state(optimizer: torch.optim.Optimizer) -> None:
    """Give every trainable parameter that has never had a gradient (MAE's unused mask token) its
    initial optimiser state, without changing any parameter or any other state.

    A sharded checkpoint resumes by loading into the state a fresh optimiser creates, which torch
    builds for *every* parameter (``torch.distributed.checkpoint.state_dict``); a saved state that
    lacks a parameter then fails with "Missing key in checkpoint state_dict". The missing entries are
    made the way torch makes them: one step with zero gradients at learning rate 0, for those
    parameters alone (the others' gradients are set aside meanwhile, so they do not step). A
    parameter whose first gradient comes after such a save (DINO's last layer, frozen for its first
    steps) then counts one more AdamW step than without sharding: its bias correction starts one
    step further on.
    """
    groups = optimizer.param_groups
    missing = {p for g in groups for p in g["params"] if p.requires_grad and p not in optimizer.state}
    if not missing:
        return
    grads = [[p.grad for p in g["params"]] for g in groups]
    lrs = [g["lr"] for g in groups]
    for g in groups:
        g["lr"] = 0.0
        for p in g["params"]:
            p.grad = torch.zeros_like(p) if p in missing else None
    optimizer.step()
    for g, lr, saved in zip(groups, lrs, grads, strict=True):
        g["lr"] = lr
        for p, grad in zip(g["params"], saved, strict=True):
            p.grad = grad


#: ``trainer.strategy`` names that shard with FSDP2, and the strategy each builds
SHARDED_STRATEGIES: dict[str, type[ModelParallelStrategy]] = {"fsdp": ShardedStrategy}


def build_strategy(name: str) -> str | ModelParallelStrategy:
    """The ``strategy`` argument of ``L.Trainer`` for ``trainer.strategy=name``: a sharded strategy
    object for the names in :data:`SHARDED_STRATEGIES`, else the name for Lightning to resolve."""
    return SHARDED_STRATEGIES[name]() if name in SHARDED_STRATEGIES else name


def mixed_precision(precision: str) -> MixedPrecisionPolicy:
    """FSDP2's policy for Lightning's ``trainer.precision`` (see :data:`MIXED_PRECISION`)."""
    if precision not in MIXED_PRECISION:
        raise ValueError(f"trainer.precision={precision!r} with FSDP: choose one of {', '.join(MIXED_PRECISION)}")
    return MIXED_PRECISION[precision]


def sharding_units(objective: nn.Module, block_classes: tuple[type[nn.Module], ...]) -> list[nn.Module]:
    """The modules that become FSDP units, innermost first (``fully_shard`` needs children before
    their parents): every instance of ``block_classes``, then ``objective`` (the root)."""
    blocks = [m for m in objective.modules() if block_classes and isinstance(m, block_classes)]
    return [*blocks, objective]


def shard_objective(objective: nn.Module, mesh: DeviceMesh, policy: MixedPrecisionPolicy) -> int:
    """``fully_shard`` the objective per :func:`sharding_units` of its encoder's declared block
    classes, over ``mesh`` (1-D, data parallel); returns the number of block units."""
    units = sharding_units(objective, objective.encoder.block_classes)
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    return len(units) - 1


def is_sharded(module: nn.Module) -> bool:
    return isinstance(module, FSDPModule)


def full_tensor(value: Tensor) -> Tensor:
    """The whole tensor of a sharded ``DTensor`` (a collective: every rank must call it), else ``value``."""
    return value.full_tensor() if isinstance(value, DTensor) else value


def full_encoder(encoder: Encoder, backbone: Mapping[str, Any]) -> Encoder:
    """An ordinary (unsharded, CPU) encoder holding the full weights of a sharded ``encoder``, built
    from its ``backbone`` config; ``encoder`` itself when it is not sharded. Every rank must call it
    (the weights are all-gathered)."""
    if not any(isinstance(p, DTensor) for p in encoder.parameters()):
        return encoder
    state = {name: full_tensor(value).detach().cpu() for name, value in encoder.state_dict().items()}
    return build_encoder(dict(backbone), weights=state, origin="the sharded encoder")
