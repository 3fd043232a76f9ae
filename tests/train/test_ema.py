"""One EMA helper and one schedule module serve every objective."""

from __future__ import annotations

import copy

import torch
from torch import nn

import objectives.dino as dino
from ssl_med.train import ema, schedules


def test_ema_matches_the_formula_and_copies_buffers_on_request() -> None:
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    teacher = copy.deepcopy(student)
    student(torch.randn(8, 4))  # moves the student's running statistics
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))
    expected = [0.9 * t + 0.1 * s for t, s in zip(teacher.parameters(), student.parameters())]
    ema.ema_update(teacher, student, 0.9)
    for t, e in zip(teacher.parameters(), expected):
        torch.testing.assert_close(t, e, rtol=0, atol=1e-7)
    assert not torch.equal(teacher[1].running_mean, student[1].running_mean)
    ema.ema_update(teacher, student, 0.9, copy_buffers=True)
    assert torch.equal(teacher[1].running_mean, student[1].running_mean)


def test_objectives_use_the_shared_helpers() -> None:
    assert dino.ema_update is ema.ema_update
    assert dino.cosine_schedule is schedules.cosine_schedule and dino.linear_warmup is schedules.linear_warmup
    assert schedules.cosine_schedule(50, 100, 1.0, 0.0) == schedules.warmup_cosine(50, 100, 1.0, 0.0)


def test_initial_share_is_what_ema_updates_leave_of_the_initial_weights() -> None:
    """Simulated: a teacher that starts at 1 with a student held at 0 ends at the share itself."""
    teacher, student = nn.Linear(1, 1, bias=False), nn.Linear(1, 1, bias=False)
    nn.init.ones_(teacher.weight)
    nn.init.zeros_(student.weight)
    momenta = [schedules.cosine_schedule(s, 300, 0.992, 1.0) for s in range(300)]
    for m in momenta:
        ema.ema_update(teacher, student, m)
    share = ema.initial_share(momenta)
    torch.testing.assert_close(teacher.weight.double().squeeze(), torch.tensor(share, dtype=torch.float64), rtol=1e-4, atol=0)
    assert 0.29 < share < 0.31, "DINO's cosine 0.992 -> 1 over 300 steps keeps ~exp(-1.2) of the random init"

