"""Routes: which queue each model's events go to.

A model's events go to ``ITRAIN_QUEUE`` unless the hash ``itrain:routes`` (model -> queue, in the
broker's Redis, beside the queues) names another (``itrain init --model M --queue Q``,
``itrain route``). Such a queue is named ``<ITRAIN_QUEUE>.<suffix>``, the suffix of
``A-Z a-z 0-9 _ -``: the key patterns ``~<ITRAIN_QUEUE>`` and ``~<ITRAIN_QUEUE>.*`` cover every
queue and no other key of the project (those start ``itrain:``).

A client reads the whole hash (one ``HGETALL``) at most once per ``ITRAIN_ROUTES_TTL`` seconds and
routes from its copy, so a call costs no extra round trip; a route changed in Redis reaches every
producer within that time. An event sent on a stale route still trains: a worker trains any
model's event from any queue it consumes, so the old queue only needs a worker until it is empty.

No I/O here: the clients read the hash and hand its reply to ``Routes.update``.
"""

from __future__ import annotations

import logging
import math
import re
import time
from collections.abc import Mapping, Sequence
from typing import Any

from producer.errors import QueueNameError

__all__ = ["DEFAULT_MODEL", "SUFFIX_PATTERN", "Routes", "check_queue_name", "group_by_queue", "parse_routes"]

logger = logging.getLogger("itrain.producer")

#: The model of an event that names none (``InteractionData.model``'s default).
DEFAULT_MODEL = "default"
#: What may follow ``<ITRAIN_QUEUE>.`` in a routed queue's name.
SUFFIX_PATTERN = r"[A-Za-z0-9_\-]{1,64}"
_SUFFIX = re.compile(SUFFIX_PATTERN)


def check_queue_name(queue: str, default: str) -> str:
    """``queue`` when a model may be routed to it: ``default`` (``ITRAIN_QUEUE``) itself or
    ``<default>.<suffix>``; ``QueueNameError`` naming the rule otherwise."""
    if queue == default:
        return queue
    head, dot, suffix = queue.rpartition(".")
    if dot and head == default and _SUFFIX.fullmatch(suffix):
        return queue
    raise QueueNameError(
        f"queue {queue!r} is not one a model can be routed to: use {default!r} (ITRAIN_QUEUE) or "
        f"{default}.<suffix>, the suffix 1 to 64 of A-Z a-z 0-9 _ - (e.g. {default}.tenant-a)"
    )


def _text(value: bytes | str) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else value


def parse_routes(raw: Mapping[bytes, bytes] | Mapping[str, str], default: str) -> dict[str, str]:
    """The routes of an ``HGETALL itrain:routes`` reply: model -> queue for every model whose
    queue is not ``default``. An entry naming a queue no model can be routed to (written by hand)
    is left out: its model's events go to ``default``, which a worker consumes, rather than to a
    key that may not be a queue at all (``itrain models`` shows such an entry)."""
    routes: dict[str, str] = {}
    for model, queue in raw.items():
        name = _text(queue)
        if name == default:
            continue
        try:
            routes[_text(model)] = check_queue_name(name, default)
        except QueueNameError:
            continue
    return routes


def group_by_queue(queues: Sequence[str]) -> dict[str, list[int]]:
    """The positions of each queue's items in ``queues``, in input order; the queues in the order
    they first appear (``train_many`` keeps each route's events in the caller's order)."""
    groups: dict[str, list[int]] = {}
    for i, queue in enumerate(queues):
        group = groups.get(queue)
        if group is None:
            groups[queue] = [i]
        else:
            group.append(i)
    return groups


class Routes:
    """A client's copy of the routes, due to be read again ``ttl`` seconds after it was read.

    Shared by a client's threads: ``update`` replaces the table in one assignment, so a reader
    sees the old table or the new one, never a mix."""

    __slots__ = ("_read_at", "default", "table", "ttl")

    def __init__(self, default: str, ttl: float) -> None:
        self.default = default
        self.ttl = ttl
        #: model -> queue of the routed models (``parse_routes``); empty: every model on ``default``.
        self.table: dict[str, str] = {}
        self._read_at = -math.inf

    def due(self) -> bool:
        """Whether the copy is older than ``ttl`` (or was never read) and must be read first."""
        return time.monotonic() - self._read_at >= self.ttl

    def update(self, reply: Any) -> None:
        """Take a fresh ``HGETALL itrain:routes`` reply: a mapping, or RESP2's flat list of
        fields and values."""
        raw = reply if isinstance(reply, Mapping) else dict(zip(reply[::2], reply[1::2], strict=True))
        self.table = parse_routes(raw, self.default)
        self._read_at = time.monotonic()

    def unreadable(self, exc: BaseException) -> None:
        """The Redis user may not read ``itrain:routes`` (a producer ACL from before routes):
        every event goes to the default queue, where a worker trains it as before, until the
        next read; said once per client, in the log."""
        if self._read_at == -math.inf:
            logger.warning(
                "cannot read the routes (%s): every event goes to queue %r; "
                "`itrain acl --role producer` prints a user that may read them",
                exc,
                self.default,
            )
        self.update({})

    def queue(self, model: str) -> str:
        """The queue of ``model``'s events."""
        return self.table.get(model, self.default)
