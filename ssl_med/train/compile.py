"""``trainer.compile``: ``torch.compile`` on the encoder and the objective's heads, eager when it fails.

What is compiled: every direct child module of the objective (the encoder, MAE's decoder, DINO's
heads and its EMA teacher, ...), each with :meth:`torch.nn.Module.compile`, which torch recommends over
``torch.compile(module)`` because the module keeps its class and parameter names: checkpoints, the
exported encoder, EMA updates and FSDP's sharding see the same module as without compilation. The
objective's own ``forward`` (masking, view bookkeeping, losses) stays eager and calls the compiled
modules, so data-dependent Python in it cannot cause graph breaks.

When: :meth:`~ssl_med.train.module.PretrainModule.configure_model`, Lightning's hook for setting the
model up once the strategy is known (after FSDP's sharding, so each compiled module runs on its
shards), before ``trainer.fit`` creates the optimiser.

Fallback: ``torch.compile`` compiles lazily, at the first call (forward) and the first backward.
A failure in the forward (an operation dynamo cannot trace, a backend or C++ compiler error) is
caught, logged as one line naming the backbone, and the step re-runs eagerly; compiled code then
stays off for the rest of the process (``torch.compiler.set_stance("force_eager")``). A failure
while compiling the backward cannot be replayed within the step and is re-raised with the same
line and the override that avoids it.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn
from torch._dynamo.exc import TorchDynamoException

log = logging.getLogger(__name__)

#: ``torch.compile``'s modes; ``reduce-overhead`` adds CUDA graphs (GPU only)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
#: errors that mean "this code did not compile", as opposed to a bug the eager run would raise too
COMPILE_ERRORS: tuple[type[BaseException], ...] = (TorchDynamoException,)

T = TypeVar("T")


@dataclass(frozen=True)
class CompileSettings:
    """How to compile (``trainer.compile_mode``); ``backend`` is torch's (``inductor``; tests use others)."""

    mode: str = "default"
    backend: str | Callable[..., Any] = "inductor"

    def __post_init__(self) -> None:
        if self.mode not in COMPILE_MODES:
            raise ValueError(f"trainer.compile_mode={self.mode!r}: choose one of {', '.join(COMPILE_MODES)}")


def compile_settings(trainer: Any) -> CompileSettings | None:
    """The run's :class:`CompileSettings` from the ``trainer`` config (``compile``, ``compile_mode``),
    ``None`` when compilation is off (the default, also for configs that do not have the keys)."""
    if not getattr(trainer, "compile", False):
        return None
    return CompileSettings(mode=getattr(trainer, "compile_mode", "default"))


def compile_children(module: nn.Module, settings: CompileSettings) -> list[str]:
    """Compile every direct child of ``module`` that has parameters, in place; returns their names."""
    names = []
    for name, child in module.named_children():
        if any(True for _ in child.parameters()):
            child.compile(mode=settings.mode, backend=settings.backend)
            names.append(name)
    return names


def failure_line(backbone: str, err: BaseException) -> str:
    """One line: which backbone did not compile and why (the first line of the error)."""
    first = next((line for line in str(err).splitlines() if line.strip()), "")
    return f"torch.compile failed for backbone {backbone!r} ({type(err).__name__}: {first[:300]})"


class CompileGuard:
    """Runs a step's forward compiled, or eagerly once compilation has failed (see the module docstring).

    Args:
        backbone: the backbone's registered name, for the message.
    """

    def __init__(self, backbone: str) -> None:
        self.backbone = backbone
        self.failed = False

    def forward(self, step: Callable[[], T]) -> T:
        """``step()``; on a compile error, log it once, turn compiled code off and run ``step()`` eagerly."""
        if self.failed:
            return step()
        try:
            return step()
        except COMPILE_ERRORS as err:
            self.failed = True
            log.warning("%s; training continues eagerly", failure_line(self.backbone, err))
            torch.compiler.set_stance("force_eager")
            return step()

    def backward(self, run: Callable[[], None]) -> None:
        """``run()`` (the backward), re-raising a compile error with the backbone and the way out."""
        try:
            run()
        except COMPILE_ERRORS as err:
            raise RuntimeError(f"{failure_line(self.backbone, err)} in the backward; run with trainer.compile=false") from err
