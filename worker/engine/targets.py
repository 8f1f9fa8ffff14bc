"""Target generation: what the model should have predicted for an event (pure functions)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import numpy.typing as npt

from producer.errors import TargetError
from producer.events import InteractionData

__all__ = ["make_target", "make_targets"]


def make_target(
    event: InteractionData, outputs: int, mapping: Mapping[str, float]
) -> npt.NDArray[np.float64]:
    """The event's ``label`` when given, else the action type's mapped value on every output.

    Raises ``TargetError`` when the label's length is not the model's output count, or when the
    action has no mapping and the event no label: the engine never trains on a made-up value.
    """
    labels = event.labels()
    if labels is not None:
        if len(labels) != outputs:
            raise TargetError(
                f"label has {len(labels)} value(s) but model {event.model!r} has {outputs} output(s)"
            )
        return np.array(labels, dtype=np.float64)
    value = mapping.get(event.action_type)
    if value is None:
        raise TargetError(
            f"action_type {event.action_type!r} has no target in ITRAIN_TARGETS and the event has no label"
        )
    return np.full(outputs, float(value), dtype=np.float64)


def make_targets(
    events: Sequence[InteractionData], outputs: int, mapping: Mapping[str, float]
) -> tuple[npt.NDArray[np.float64], dict[int, TargetError]]:
    """``make_target`` for every event at once: a (len(events), outputs) matrix, and the error of
    each event that has no target (its row is NaN). Row ``i`` equals ``make_target(events[i], ...)``.
    """
    values: list[float] = []
    odd: list[int] = []  # labelled or unmapped: made one by one, as make_target does
    nan = float("nan")
    for i, event in enumerate(events):
        value = mapping.get(event.action_type) if event.label is None else None
        if value is None:
            odd.append(i)
            values.append(nan)
        else:
            values.append(float(value))
    Y = np.empty((len(events), outputs), dtype=np.float64)
    Y[:] = np.array(values, dtype=np.float64).reshape(-1, 1)
    errors: dict[int, TargetError] = {}
    for i in odd:
        try:
            Y[i] = make_target(events[i], outputs, mapping)
        except TargetError as exc:
            errors[i] = exc
    return Y, errors
