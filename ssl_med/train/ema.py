"""The exponential moving average every EMA teacher uses (DINO, VoCo)."""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn


@torch.no_grad()
def ema_update(teacher: nn.Module, student: nn.Module, momentum: float, *, copy_buffers: bool = False) -> None:
    """``theta_t <- m theta_t + (1 - m) theta_s`` for every parameter, matched by name.

    Args:
        teacher: the EMA copy, updated in place (its parameters may be in another dtype; the student's
            are cast to it).
        student: the trained module; every parameter name must exist in ``teacher``.
        momentum: ``m`` in ``[0, 1]``.
        copy_buffers: also copy the student's buffers (e.g. norm statistics) into the teacher's.
    """
    t_params = dict(teacher.named_parameters())
    pairs = [(t_params[name], p) for name, p in student.named_parameters()]
    if pairs:
        t_list = [t for t, _ in pairs]
        s_list = [s.detach().to(t.dtype) for t, s in pairs]
        torch._foreach_mul_(t_list, momentum)
        torch._foreach_add_(t_list, s_list, alpha=1.0 - momentum)
    if copy_buffers:
        t_buffers = dict(teacher.named_buffers())
        for name, buffer in student.named_buffers():
            t_buffers[name].copy_(buffer)


def initial_share(momenta: Iterable[float]) -> float:
    """The weight a teacher's initial parameters still hold after EMA updates with these ``momenta``.

    After ``theta_t <- m theta_t + (1 - m) theta_s`` at momenta ``m_1 ... m_T`` the teacher is
    ``prod(m) theta_t(0)`` plus a weighted average of the student's weights: a momentum schedule made for
    hundreds of epochs (DINO's cosine 0.992 -> 1) leaves a 300-step teacher ``exp(-0.008 * 300 / 2)`` =
    30 % its random initialisation.
    """
    return math.prod(momenta)


#: above this share of its initialisation an EMA teacher is reported at the start of a run
INITIAL_SHARE_WARN = 0.05
