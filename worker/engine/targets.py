"""Target generation: what the model should have predicted for an event (pure functions)."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from producer.errors import TargetError
from producer.events import InteractionData

__all__ = ["make_target"]


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
