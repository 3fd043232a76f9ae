"""What a crop dataset does when a sample cannot be read (``data.on_error``).

``raise`` (the default): the :class:`~ssl_med.data.integrity.ChunkError` naming the image and chunk
stops training. ``skip``: the sample is drawn again, deterministically (draw ``r`` of sample ``i``
uses its own random stream, so a resumed run skips the same way), and every skip is counted and
logged. The run still stops, with :class:`TooManyFaults`, when the skips exceed
``max_error_fraction`` of the draws, or when one sample fails :data:`MAX_REDRAWS` draws in a row
(e.g. every chunk of the store lost). Each DataLoader worker counts its own draws, and the fraction
is judged against at least :data:`MIN_DRAWS` draws so that one early fault does not stop a run.

With ``skip`` every sample carries its count of failed draws (``sample[SKIPPED_KEY]``, an int the
DataLoader collates into a ``(B,)`` tensor), so the count crosses from (spawned) workers to the
training process with the batch itself; :class:`~ssl_med.train.module.PretrainModule` removes it from
the batch and logs the run's total as ``data/skipped_samples`` (TensorBoard).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

from ssl_med.data.integrity import ChunkError

log = logging.getLogger(__name__)

ON_ERROR = ("raise", "skip")
MAX_REDRAWS = 8
MIN_DRAWS = 50
SKIPPED_KEY = "skipped_draws"  #: per-sample count of failed draws, with on_error=skip

T = TypeVar("T")


class TooManyFaults(RuntimeError):
    """More samples failed than ``data.max_error_fraction`` allows (or one sample never succeeded)."""


@dataclass
class FaultPolicy:
    """Applies ``data.on_error`` to the draws of one dataset copy (one per DataLoader worker).

    Attributes:
        on_error: ``"raise"`` or ``"skip"``.
        max_error_fraction: largest fraction of draws that may be skipped before the run stops.
        draws, skipped: counts so far (in this process).
    """

    on_error: str = "raise"
    max_error_fraction: float = 0.05
    draws: int = 0
    skipped: int = 0

    def __post_init__(self) -> None:
        if self.on_error not in ON_ERROR:
            raise ValueError(f"data.on_error must be one of {ON_ERROR}, got {self.on_error!r}")
        if not 0.0 <= self.max_error_fraction <= 1.0:
            raise ValueError(f"data.max_error_fraction must lie in [0, 1], got {self.max_error_fraction}")

    def sample(self, index: int, draw: Callable[[int, int], T]) -> T:
        """``draw(index, redraw)`` for ``redraw = 0, 1, ...`` until one succeeds (``skip``), or once (``raise``)."""
        if self.on_error == "raise":
            return draw(index, 0)
        for redraw in range(MAX_REDRAWS):
            self.draws += 1
            try:
                sample = draw(index, redraw)
            except ChunkError as exc:
                self.skipped += 1
                log.warning("data.on_error=skip: sample %d, draw %d skipped: %s (%d of %d draws skipped)",
                            index, redraw, exc, self.skipped, self.draws)  # fmt: skip
                if self.skipped > self.max_error_fraction * max(self.draws, MIN_DRAWS):
                    raise TooManyFaults(
                        f"{self.skipped} of {self.draws} draws failed, more than data.max_error_fraction="
                        f"{self.max_error_fraction}; the last: {exc} (run `ssl_med ingest --verify`)"
                    ) from exc
                last = exc
                continue
            if isinstance(sample, dict):
                sample[SKIPPED_KEY] = redraw  # the draws of this sample that failed before this one
            return sample
        raise TooManyFaults(
            f"sample {index}: {MAX_REDRAWS} draws in a row failed, the last: {last}"
        ) from last
