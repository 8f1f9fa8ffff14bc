"""The Redis key layout: every key the project writes, in one place.

Every key of one model carries the hash tag ``{model}`` (they hash to one Redis Cluster slot:
``tests/unit/test_keys.py``). The project does not run on a Redis Cluster all the same: the broker's
keys, ``itrain:models``, the unrouted dead letters and job results sit in other slots, and some
scripts touch several (see the README's "Redis key layout"). Every script declares each key it
touches in KEYS.

| key | type | what |
|---|---|---|
| ``itrain:layout`` | string | the store's layout version (``producer.formats``); absent: layout 1 |
| ``itrain:models`` | set | names of initialised models |
| ``itrain:routes`` | hash | model -> its queue (``producer.routes``), in the broker's Redis; a model |
| | | not in it uses ``ITRAIN_QUEUE`` |
| ``itrain:{m}:ckpt`` | hash | the checkpoint: ``params`` (raw little-endian float64), ``meta``, |
| | | ``config``, ``version``, ``step``, ``loss_last``, ``loss_ema``, ``updated_at``; the online |
| | | evaluation (``eval``, ``eval_wn``, ``eval_cap``: ``producer.evaluation``) and the guard |
| | | (``guard``, ``guard_loss``, ``guard_ref``, ``paused``, ``trips``: ``worker.engine.guard``) |
| ``itrain:{m}:eval`` | string | the evaluation window's records (``producer.evaluation.RECORD``) |
| ``itrain:{m}:stats`` | hash | analytics counters: ``interactions``, ``failures`` |
| ``itrain:{m}:actions`` | hash | interactions per action type |
| ``itrain:{m}:history`` | list | the last ``ITRAIN_HISTORY_MAX`` training examples, newest first (JSON) |
| ``itrain:{m}:dead`` | list | the last ``ITRAIN_DEAD_LETTER_MAX`` failed messages, newest first (JSON) |
| ``itrain:{m}:lock`` | string | the update lock's token, with a TTL of ``ITRAIN_LOCK_TIMEOUT`` |
| ``itrain:{m}:snapshots`` | list | versions of the kept snapshots, newest first (``ITRAIN_SNAPSHOT_KEEP``) |
| ``itrain:{m}:snap:<version>`` | hash | a copy of the checkpoint at that version, ``snapshot_at`` and |
| | | ``eval_ring`` (the evaluation window then) |
| ``itrain:{m}:lock_stats`` | hash | lock wait and hold per critical section, as histogram bucket |
| | | counts (``w:<i>``, ``h:<i>``) and sums (``w:sum``, ``h:sum``) (``itrain exporter``) |
| ``itrain:{m}:latency`` | hash | per trained event, written by the commit: the time from enqueue to |
| | | commit (``e:<i>``, ``e:sum``) and from the event's timestamp to commit (``f:<i>``, ``f:sum``), as |
| | | histogram bucket counts over ``LATENCY_BUCKETS`` and sums (``itrain exporter``) |
| ``itrain:{m}:dead_errors`` | hash | dead letters by error type (the entry's ``error``) -> count, |
| | | written with the dead letters (at most 64 names, the rest under ``_other``) |
| ``itrain:{m}:done:<gen>:<slot>`` | hash | ``marker_field(event id)`` -> the step that trained it, for |
| | | events trained in one slot of time (a quarter of ``ITRAIN_DEDUPE_TTL``); expires a window |
| | | after its slot |
| ``itrain:{_unrouted}:dead`` | list | failed messages that name no initialised model |
| ``itrain:{_unrouted}:dead_errors`` | hash | their count by error type |
| ``itrain:{_queues}:heads`` | hash | queue -> ``<sha1 of its head message> <unix time>``: when a |
| | | worker first saw a message without an enqueue-time header at the head of that queue |
| ``itrain:{_transport}:rejected`` | list | queue items that were not message envelopes (reason and size) |
| ``itrain:{_transport}:gather:<queue>`` | string | the worker gathering that queue's messages for a |
| | | fetch window (``worker/consume/fetch_window.py``); lives as long as the window |
| ``itrain:{_transport}:gather-end:<queue>`` | string | when that queue's last fetch window ends (ms, |
| | | Redis's clock; ``lua/gather.lua``); expires after 60 s |
| ``unacked``, ``unacked_index`` | hash, zset | messages taken by a worker, not yet acknowledged (kombu) |
| ``unacked_deliveries`` | hash | times each unacknowledged message was handed out |
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

__all__ = [
    "LAYOUT",
    "LATENCY_BUCKETS",
    "LOCK_BUCKETS",
    "MODELS",
    "QUEUE_HEADS",
    "ROUTES",
    "TRANSPORT_REJECTED",
    "UNROUTED_DEAD",
    "UNROUTED_DEAD_ERRORS",
    "ModelKeys",
    "marker_field",
    "marker_slots",
    "slot_seconds",
]

#: The store's layout version (``producer.formats``); a store without it is layout 1.
LAYOUT = "itrain:layout"
MODELS = "itrain:models"
#: model -> queue of the models given a queue of their own (``producer.routes``).
ROUTES = "itrain:routes"
#: Upper bounds (seconds) of the lock wait and hold histogram buckets; the last bucket is +Inf.
LOCK_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)
#: Upper bounds (seconds) of the enqueue-to-commit and freshness histogram buckets (the last is
#: +Inf): from a micro-batch's few milliseconds to a day-old event.
LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0,
    3600.0, 21600.0, 86400.0,
)  # fmt: skip
UNROUTED_DEAD = "itrain:{_unrouted}:dead"
UNROUTED_DEAD_ERRORS = "itrain:{_unrouted}:dead_errors"
#: When a worker first saw each queue's head message, for one without an enqueue time.
QUEUE_HEADS = "itrain:{_queues}:heads"
#: Queue items the worker's transport refused as not being message envelopes (bounded).
TRANSPORT_REJECTED = "itrain:{_transport}:rejected"


@dataclass(frozen=True, slots=True)
class ModelKeys:
    """The keys of one model."""

    model: str

    @property
    def prefix(self) -> str:
        return f"itrain:{{{self.model}}}:"

    @property
    def ckpt(self) -> str:
        return self.prefix + "ckpt"

    @property
    def stats(self) -> str:
        return self.prefix + "stats"

    @property
    def actions(self) -> str:
        return self.prefix + "actions"

    @property
    def eval_ring(self) -> str:
        return self.prefix + "eval"

    @property
    def history(self) -> str:
        return self.prefix + "history"

    @property
    def dead(self) -> str:
        return self.prefix + "dead"

    @property
    def lock(self) -> str:
        return self.prefix + "lock"

    @property
    def lock_stats(self) -> str:
        return self.prefix + "lock_stats"

    @property
    def latency(self) -> str:
        return self.prefix + "latency"

    @property
    def dead_errors(self) -> str:
        return self.prefix + "dead_errors"

    @property
    def snapshots(self) -> str:
        return self.prefix + "snapshots"

    @property
    def snapshot_prefix(self) -> str:
        return self.prefix + "snap:"

    def done_prefix(self, gen: int) -> str:
        """Event markers of one generation of the model (``itrain init --force`` starts another)."""
        return f"{self.prefix}done:{gen}:"

    def done(self, gen: int, slot: int) -> str:
        """The markers of the events trained in one slot of time (see ``marker_slots``)."""
        return self.done_prefix(gen) + str(slot)


def slot_seconds(window: int) -> int:
    """How long one marker slot lasts: a quarter of the de-duplication window, at least 1 s."""
    return max(1, -(-window // 4))


def marker_slots(now: float, window: int) -> range:
    """The slots a marker written in the last ``window`` seconds may be in, one slot of margin on
    each side for clocks that differ between hosts (commit.lua writes to ``floor(now / width)``)."""
    width = slot_seconds(window)
    return range(int((now - window) // width) - 1, int(now // width) + 2)


def marker_field(event_id: str) -> bytes:
    """An event's field in the marker hashes: a 96-bit digest of its id, not the id itself.

    Event ids are up to 128 characters (UUIDs: 36); 12 bytes fit Redis's smallest string
    allocation, and cut a marker from ~85 to ~55 bytes. Two ids with the same digest would make
    the second answer ``duplicate``: at a million events in the window the odds are about 1 in
    10**16."""
    return hashlib.blake2b(event_id.encode("utf-8", "surrogatepass"), digest_size=12).digest()
