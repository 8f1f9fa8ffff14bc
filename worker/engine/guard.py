"""A model's guard: pause training and roll back when the online log loss degrades (pure rules).

A guard has a window W and a ratio R. At every commit the trainer measures the log loss over the
model's last W events (test-then-train: each event scored before its update,
``worker.engine.evaluation``); each snapshot keeps the figure measured when it was taken. The
*reference* is the lowest such figure among the kept snapshots (``snapshot.lua`` keeps it in the
checkpoint's ``guard_ref``). When the window's loss exceeds R times the reference, the guard
trips: the trainer refuses the batch, rolls the model back to that snapshot and pauses it, in one
fenced write (``worker.store.guard``), until ``itrain resume``.

Setting a guard (``itrain guard``, even with the same values) starts a new *baseline*: its epoch
rises, and only snapshots measured under that epoch can be its reference, so a guard arms at the
first snapshot taken with its window full after it was set. A resume keeps the baseline. The window
restarts after a trip, a rollback and a resume, so the old losses never trip it again.

Stored in the checkpoint hash as plain strings (Lua reads them without a JSON parser):
``guard`` = ``"W R E"`` (E the epoch, written by ``guard.lua``), ``guard_loss`` = ``"loss W:E"``
(written by each commit of a guarded model), ``guard_ref`` = ``"loss version"``, ``paused`` =
``"1"``, ``trips`` = count.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from producer.errors import ConfigurationError

__all__ = ["MAX_WINDOW", "Guard", "Reference", "parse_guard", "parse_reference", "tripped"]


#: The widest guard window, as the evaluation window's limit (``ITRAIN_EVAL_WINDOW``).
MAX_WINDOW = 100_000


@dataclass(frozen=True, slots=True)
class Guard:
    """Trip when the log loss over the last ``window`` events exceeds ``ratio`` x the reference."""

    window: int
    ratio: float
    #: The baseline's number (``guard.lua`` raises it each time a guard is set).
    epoch: int = 0

    def __post_init__(self) -> None:
        if not 1 <= self.window <= MAX_WINDOW:
            raise ConfigurationError(f"a guard's window must be 1 to {MAX_WINDOW} events, got {self.window}")
        if not (math.isfinite(self.ratio) and self.ratio >= 1.0):
            raise ConfigurationError(
                f"a guard's ratio must be a finite number of at least 1, got {self.ratio:g}"
            )

    def encode(self) -> str:
        """``"W R"``: ``guard.lua`` appends the new epoch."""
        return f"{self.window} {self.ratio!r}"

    @property
    def baseline(self) -> str:
        """``"W:E"``: what a commit's ``guard_loss`` and a snapshot's are measured under."""
        return f"{self.window}:{self.epoch}"


@dataclass(frozen=True, slots=True)
class Reference:
    """The best recent snapshot: its windowed log loss and its version."""

    loss: float
    version: int


def _text(raw: bytes | str | None) -> str:
    return raw.decode() if isinstance(raw, bytes) else (raw or "")


def parse_guard(raw: bytes | str | None) -> Guard | None:
    parts = _text(raw).split()
    if len(parts) not in (2, 3):
        return None
    return Guard(int(parts[0]), float(parts[1]), int(parts[2]) if len(parts) == 3 else 0)


def parse_reference(raw: bytes | str | None) -> Reference | None:
    parts = _text(raw).split()
    return Reference(float(parts[0]), int(parts[1])) if len(parts) == 2 else None


def tripped(guard: Guard | None, loss: float, ref: Reference) -> bool:
    """Whether the window's log loss ``loss`` trips ``guard`` against ``ref``."""
    return guard is not None and loss > guard.ratio * ref.loss
