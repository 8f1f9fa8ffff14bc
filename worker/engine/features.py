"""Preprocessing: an interaction becomes the spec's four input features (pure functions).

input[0] = action_type_hash     in [-1, 1]
input[1] = timestamp_normalized time of day in [0, 1), UTC
input[2] = user_hash            in [-1, 1]
input[3] = context_indicator    1.0 when the context has entries, else 0.0
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from functools import lru_cache
from hashlib import blake2b

import numpy as np
import numpy.typing as npt

from producer.events import InteractionData

__all__ = [
    "N_FEATURES",
    "action_hash",
    "featurize",
    "featurize_many",
    "time_of_day",
    "unit_hash",
    "user_hash",
]

N_FEATURES = 4
_U64_MAX = float(2**64 - 1)
_SECONDS_PER_DAY = 86400.0


def unit_hash(text: str, person: bytes) -> float:
    """A hash of ``text`` mapped to [-1, 1], the same in every process, host and Python version.

    blake2b, not the built-in ``hash()``, which is salted per process.
    """
    digest = blake2b(text.encode("utf-8"), digest_size=8, person=person).digest()
    return int.from_bytes(digest, "big") / _U64_MAX * 2.0 - 1.0


# Memoised per process: users and actions repeat, and a hash costs ~20 times a cache hit. The
# caches are bounded (least recently used out) and live in this process's memory only.
@lru_cache(maxsize=1024)
def action_hash(action_type: str) -> float:
    return unit_hash(action_type, b"itrain-action")


@lru_cache(maxsize=65_536)
def user_hash(user_id: str) -> float:
    # The raw user id goes no further than this hash (and its in-memory cache): it is never stored.
    return unit_hash(user_id, b"itrain-user")


def time_of_day(ts: datetime) -> float:
    """Seconds since midnight UTC over 86400, in [0, 1). ``ts`` must be timezone-aware UTC."""
    seconds = ts.hour * 3600 + ts.minute * 60 + ts.second + ts.microsecond / 1e6
    return seconds / _SECONDS_PER_DAY


def featurize(event: InteractionData) -> npt.NDArray[np.float64]:
    """The four features of one event."""
    return np.array(_row(event), dtype=np.float64)


def featurize_many(events: Sequence[InteractionData]) -> npt.NDArray[np.float64]:
    """A (len(events), 4) matrix, one row per event, in order."""
    if not events:
        return np.empty((0, N_FEATURES), dtype=np.float64)
    # Column by column, then one conversion: far cheaper than building or assigning rows.
    columns = [
        [action_hash(e.action_type) for e in events],
        [time_of_day(e.timestamp) for e in events],
        [user_hash(e.user_id) for e in events],
        [1.0 if e.context else 0.0 for e in events],
    ]
    return np.ascontiguousarray(np.array(columns, dtype=np.float64).T)


def _row(event: InteractionData) -> tuple[float, float, float, float]:
    return (
        action_hash(event.action_type),
        time_of_day(event.timestamp),
        user_hash(event.user_id),
        1.0 if event.context else 0.0,
    )
