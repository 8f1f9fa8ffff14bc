"""The age of the oldest waiting message of a queue, from its head (``itrain exporter``).

Workers take a queue's messages from its head (kombu's Redis lists: ``LPUSH`` in, ``RPOP`` out,
so the head is index -1): the head is the oldest message still waiting, and its age is what says
a queue is stuck. The age comes from, in order:

1. the head's ``itrain_enqueued_at`` header (``producer.enqueue_time``), written by our clients;
2. for a head without it (another language's message), when a worker first saw it at the head
   (``worker.consume.queue_heads`` notes the SHA-1 of its text and the time in
   ``itrain:{_queues}:heads``);
3. when no worker has seen it yet (none running), when this exporter first saw it (kept in the
   exporter's memory: another exporter, or this one restarted, starts counting again).

An empty queue's age is 0. Ages are taken against Redis's clock (``TIME``, read in the same
round trip): a first sighting is Redis's time, an enqueue time the producer's clock.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Any

import orjson

from producer.enqueue_time import enqueued_at

__all__ = ["HeadAges"]


@dataclass
class HeadAges:
    """The ages of queue heads, scrape after scrape (holds this exporter's own first sightings)."""

    #: queue -> (SHA-1 of the head's text, when this exporter first saw it).
    seen: dict[str, tuple[str, float]] = field(default_factory=dict)

    def age(self, queue: str, head: bytes | None, noted: bytes | None, now: float) -> float:
        """Seconds the head of ``queue`` has waited at ``now``: ``head`` is its text (None: the
        queue is empty), ``noted`` the workers' note of it (``<sha1> <time>``) or None."""
        if head is None:
            self.seen.pop(queue, None)
            return 0.0
        stamped = enqueued_at(_headers(head))
        if stamped is not None:
            self.seen.pop(queue, None)
            return max(0.0, now - stamped)
        sha = hashlib.sha1(head).hexdigest()
        first = _noted_time(noted, sha)
        if first is None:
            mine = self.seen.get(queue)
            if mine is None or mine[0] != sha:
                mine = self.seen[queue] = (sha, now)
            first = mine[1]
        return max(0.0, now - first)


def _headers(head: bytes) -> dict[str, Any]:
    """A queue item's headers; empty for an item that is not a message envelope."""
    try:
        envelope = orjson.loads(head)
    except orjson.JSONDecodeError:
        return {}
    headers = envelope.get("headers") if isinstance(envelope, dict) else None
    return headers if isinstance(headers, dict) else {}


def _noted_time(noted: bytes | None, sha: str) -> float | None:
    """The time of the workers' note when it is of this head (same SHA-1), else None."""
    if not noted:
        return None
    noted_sha, _, when = noted.decode("ascii", "replace").partition(" ")
    if noted_sha != sha:
        return None
    try:
        return float(when)
    except ValueError:
        return None
