"""Preprocessing: an interaction becomes the spec's four input features, as numpy arrays.

input[0] = action_type_hash     in [-1, 1]
input[1] = timestamp_normalized time of day in [0, 1), UTC
input[2] = user_hash            in [-1, 1]
input[3] = context_indicator    1.0 when the context has entries, else 0.0

The features themselves are ``producer.features`` (pure Python), which a service's in-process
``ModelReader`` uses too, so the two always agree. The hashes are keyed with ``ITRAIN_HASH_KEY``
(a stored feature cannot then be reversed with a dictionary of user ids) and memoised per process
(users and actions repeat; a hash costs ~20 times a cache hit).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cache

import numpy as np
import numpy.typing as npt

from producer.events import InteractionData
from producer.features import N_FEATURES, Featurizer, time_of_day, unit_hash
from producer.settings import get_settings

__all__ = [
    "N_FEATURES",
    "action_hash",
    "featurize",
    "featurize_many",
    "featurizer",
    "time_of_day",
    "unit_hash",
    "user_hash",
]


@cache
def featurizer() -> Featurizer:
    """This process's featurizer, keyed with ``ITRAIN_HASH_KEY`` (read once)."""
    return Featurizer(get_settings().hash_key_bytes)


def action_hash(action_type: str) -> float:
    return featurizer().action(action_type)


def user_hash(user_id: str) -> float:
    # The raw user id goes no further than this hash (and its in-memory cache): it is never stored.
    return featurizer().user(user_id)


def featurize(event: InteractionData) -> npt.NDArray[np.float64]:
    """The four features of one event."""
    return np.array(featurizer().row(event), dtype=np.float64)


def featurize_many(events: Sequence[InteractionData]) -> npt.NDArray[np.float64]:
    """A (len(events), 4) matrix, one row per event, in order."""
    if not events:
        return np.empty((0, N_FEATURES), dtype=np.float64)
    f = featurizer()
    # Column by column, then one conversion: far cheaper than building or assigning rows.
    columns = [
        [f.action(e.action_type) for e in events],
        [time_of_day(e.timestamp) for e in events],
        [f.user(e.user_id) for e in events],
        [1.0 if e.context else 0.0 for e in events],
    ]
    return np.ascontiguousarray(np.array(columns, dtype=np.float64).T)
