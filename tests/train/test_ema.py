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
