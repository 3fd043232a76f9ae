"""Small helpers used across the package."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")


def to_tuple(value: T | Sequence[T], n: int) -> tuple[T, ...]:
    """``3 -> (3, 3)`` for ``n=2``; a sequence must already have length ``n``."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != n:
            raise ValueError(f"expected {n} values, got {tuple(value)}")
        return tuple(value)
    return (value,) * n  # type: ignore[return-value]
