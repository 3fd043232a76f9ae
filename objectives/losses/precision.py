"""Loss inputs in float32 under mixed precision.

Under ``torch.autocast`` (``trainer.precision=bf16-mixed`` / ``16-mixed``) heads and decoders return
bf16/fp16 activations. Losses upcast them before reducing: squared errors, logs of values near 0
or 1 and sums over many terms need float32's 24-bit mantissa, not bf16's 8 bits.
"""

from __future__ import annotations

import torch
from torch import Tensor


def upcast(t: Tensor) -> Tensor:
    """``t`` in at least float32: half-precision values become float32; float32 and float64 are kept
    (``.float()`` would downcast float64, which the reference tests use)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))
