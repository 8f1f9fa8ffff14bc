"""A model's guard: pause training and roll back when the online log loss degrades (pure rules).

A guard has a window W and a ratio R. Every event is scored before its own update
(test-then-train, ``worker.engine.evaluation``). At every commit the trainer checks **every window
of W consecutive events that ends in the batch**: the batch's own windows and those that begin in
earlier commits (the last W - 1 losses of the evaluation window complete them). Only events since
the window last restarted count, so a window is full once the model has scored W events since
then. When the mean log loss of any full window exceeds R times the *reference*, the guard trips:
the trainer refuses the whole batch, rolls the model back to the reference snapshot and pauses it,
in one fenced write (``worker.store.guard``), until ``itrain resume``. ``worst_window`` finds the
highest window in O(n + W) from running sums, so a batch of any size is checked in full: a large
batch can no longer learn a bad stream before the guard looks at its last W events.

The *reference* is the best recent snapshot's log loss over its evaluation window (its last
``ITRAIN_EVAL_WINDOW`` events, at least W: the figure ``itrain snapshots`` lists). Each commit of
a guarded model writes that figure once W events were scored (``guard_loss``); each snapshot keeps
the figure of its moment, and the reference is the lowest among the kept snapshots
(``snapshot.lua`` keeps it in the checkpoint's ``guard_ref``). A figure over the whole evaluation
window rather than over W events keeps the reference from being the luckiest of several noisy
W-event figures: checked against every window, a noisy low reference is what would make a clean
stream trip.

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

import numpy as np
import numpy.typing as npt

from producer.errors import ConfigurationError

__all__ = [
    "MAX_WINDOW",
    "Guard",
    "Reference",
    "Window",
    "parse_guard",
    "parse_reference",
    "tripped",
    "worst_window",
]

Array = npt.NDArray[np.float64]


#: The widest guard window, as the evaluation window's limit (``ITRAIN_EVAL_WINDOW``).
MAX_WINDOW = 100_000


@dataclass(frozen=True, slots=True)
class Guard:
    """Trip when the log loss over any ``window`` consecutive events exceeds ``ratio`` x the reference."""

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


@dataclass(frozen=True, slots=True)
class Window:
    """The worst window a batch scored: its mean log loss, and the position in the batch (0-based,
    in training order) of its last event."""

    loss: float
    end: int


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
    """Whether a window's log loss ``loss`` trips ``guard`` against ``ref``."""
    return guard is not None and loss > guard.ratio * ref.loss


def worst_window(earlier: Array, losses: Array, window: int) -> Window | None:
    """The window of ``window`` consecutive events with the highest mean loss among those that end
    in ``losses`` (a batch's, in training order), preceded by ``earlier`` (the losses scored
    before the batch since the window restarted, oldest first; only the last ``window - 1``
    matter). ``None`` when no such window is full.

    One running sum over the concatenation: the sum of a window is the difference of two prefix
    sums, so every window costs O(1) and the whole batch O(n + window).
    """
    if window <= 0 or len(losses) == 0:
        return None
    earlier = earlier[len(earlier) - min(len(earlier), window - 1) :]
    if len(earlier) + len(losses) < window:
        return None
    prefix = np.empty(len(earlier) + len(losses) + 1)
    prefix[0] = 0.0
    np.cumsum(np.concatenate((earlier, losses)), out=prefix[1:])
    sums = prefix[window:] - prefix[:-window]
    k = int(np.argmax(sums))
    # Window k covers events k .. k + window - 1 of the concatenation.
    return Window(float(sums[k]) / window, k + window - 1 - len(earlier))
