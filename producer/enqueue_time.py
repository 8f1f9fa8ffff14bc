"""The enqueue-time header: when a producer put a message on its queue.

The contract fixes a task message's body (the event), not its headers, so the time goes in a
header of its own, ``itrain_enqueued_at``: unix seconds (a JSON number, the producer's clock).
The Python clients write it on every message (a lingering batch carries the time its first event
was accepted); a message from another language may leave it out. It feeds what an operator pages
on: the age of the oldest waiting message per queue (``itrain exporter``) and the time from
enqueue to commit (``worker.store.latency``).

A message without the header (or with a value that is not a plausible time: a hostile or broken
sender) is counted from when a worker first saw it: the transport's first take for the time to
commit, and the first sighting of it at the head of its queue for the queue's age
(``worker.consume.queue_heads``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

__all__ = ["ENQUEUED_HEADER", "ENQUEUED_MARK", "enqueued_at"]

ENQUEUED_HEADER = "itrain_enqueued_at"
#: The header's name as it appears in a message's JSON text (found without parsing the message).
ENQUEUED_MARK = b'"' + ENQUEUED_HEADER.encode() + b'"'

# 2001-09-09 to 2286-11-20: a number outside is not a unix time in seconds (milliseconds, a
# counter, garbage) and is read as absent.
_EARLIEST, _LATEST = 1e9, 1e10


def enqueued_at(headers: Mapping[str, Any]) -> float | None:
    """The message's enqueue time (unix seconds) from its headers; None when absent or not a
    plausible time. Never raises (the worker's main process and the exporter call it)."""
    value = headers.get(ENQUEUED_HEADER)
    if type(value) is not float and type(value) is not int:  # not bool, not a string
        return None
    seconds = float(value)
    return seconds if math.isfinite(seconds) and _EARLIEST < seconds < _LATEST else None
