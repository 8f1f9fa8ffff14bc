"""What an event's marker holds: the step it trained at and, since this release, which result id
trained it.

A marker is a field of a per-slot hash (``producer.keys.marker_field``, written by
``lua/commit.lua``). Its value has always been the event's step; a commit now appends ``:`` and an
8-byte digest of the id of the result that trained it (a ``train_step`` task id, or a chunk
entry's handle id). That is what lets a redelivered message tell the truth when a failover kept
its commit and lost its result: the promoted replica holds the weights and the marker (a prefix of
the old master's stream) but not the result written after the lock was given back, so the message
comes back, finds its event marked, and would answer ``duplicate`` although it trained it. A job
whose marker names its own result id answers ``trained`` with the marker's step instead; a re-send
of the event under another id still answers ``duplicate``.

No store layout change: every release reads a marker only for its existence (``lua/done.lua``),
so older workers read the longer value as before, and a value without the digest (written by an
older worker) answers ``duplicate`` as it always did.
"""

from __future__ import annotations

import hashlib

from worker.outcome import Outcome

__all__ = ["Mark", "own_trained", "parse_mark", "result_digest"]


def result_digest(result_id: str) -> bytes:
    """The 8 bytes a marker keeps of the result id that trained its event. Two ids of one event
    with the same digest would let a re-send answer ``trained``: odds about 1 in 10**19."""
    return hashlib.blake2b(result_id.encode("utf-8", "surrogatepass"), digest_size=8).digest()


class Mark:
    """A marker's value: the event's step, and the digest of its result id (None when written by
    an older worker)."""

    __slots__ = ("digest", "step")

    def __init__(self, step: int, digest: bytes | None) -> None:
        self.step = step
        self.digest = digest

    def names(self, result_id: str) -> bool:
        """Whether this marker was written by the commit that answered ``result_id``."""
        return self.digest is not None and self.digest == result_digest(result_id)


def parse_mark(value: bytes) -> Mark | None:
    """A marker's value (``step`` or ``step:digest``); None for anything else."""
    head, sep, digest = value.partition(b":")
    try:
        step = int(head)
    except ValueError:
        return None
    if step < 1 or (sep and len(digest) != 8):
        return None
    return Mark(step, digest if sep else None)


def own_trained(value: bytes, task_id: str, model: str, event_id: str, version: int) -> Outcome | None:
    """The ``trained`` answer of job ``task_id`` when the marker ``value`` of its event names it
    (else None: ``duplicate`` stands). ``step`` is the marker's; ``version`` the caller's current
    checkpoint version (it contains the event: versions only grow); ``loss`` is null, since the
    loss of that update is not kept."""
    mark = parse_mark(value)
    if mark is None or not mark.names(task_id):
        return None
    result = {
        "status": "trained",
        "model": model,
        "event_id": event_id,
        "step": mark.step,
        "version": version,
        "loss": None,
    }
    return Outcome(task_id, "SUCCESS", result, event_id=event_id)
