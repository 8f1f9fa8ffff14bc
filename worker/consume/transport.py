"""Our kombu Redis transport: atomic multi-fetch, batched acks, one Redis client per channel.

kombu's Redis transport takes a message with ``BRPOP`` and records it as unacknowledged in a
second command: a worker or a Redis that dies between the two loses the message (measured: 3
events lost in 3 Redis ``kill -9`` runs). It also builds a new ``redis.Redis`` for every ack,
record and event publish (~60 µs each), re-serialises each envelope into its unacked record and
acks one message per round trip: ~0.9-1.8 ms of main-process CPU a message.

This transport keeps kombu's queue format (a plain Redis list of JSON envelopes; every Celery
client, celery-node and a raw ``LPUSH`` still publish to it) and kombu's unacked layout (so
redelivery after ``ITRAIN_VISIBILITY_TIMEOUT`` works as before), and changes how messages are
taken:

- **Wait without taking.** An idle consumer blocks in ``BLMOVE q q RIGHT RIGHT``, which returns
  when a message arrives and leaves the list as it was: no busy polling, no extra latency for a
  lone message, and nothing is held in flight while waiting. A consumer of several queues blocks
  so on each of them, one connection per queue (``_Waiters``), and fetches from all of them when
  any answers.
- **Fair between queues**: a fetch shares its messages among the queues that have some, and each
  queue may hold an equal share of the prefetch window (``Channel._fetch_caps``), so a flooded
  queue never keeps another's messages out (pool jobs then take turns by queue:
  ``worker/consume/turns.py``).
- **Take and record in one script** (``lua/fetch.lua``): up to ``fetch_max`` messages are popped
  and each is recorded as unacknowledged in the same atomic call, from its original text. There is
  no instant at which a message is neither on the queue nor recorded. While messages keep coming
  (a full fetch) the next fetch is sent straight away: one round trip per batch, no wait.
- **Gather what comes fast** (``fetch_window``): a wait answered while messages have been
  arriving fast enough to gather a few within ``ITRAIN_BATCH_WAIT_MS`` is followed by that
  window and then one fetch of everything that came, instead of a fetch (and a pool job) per
  message; at a low rate the fetch is sent at once. On a queue of its own, one worker gathers
  at a time (``lua/gather.lua``: a key per queue that lives as long as the window), and only one
  whose pool has a free process asks (``turns.pool_has_room``): every idle worker is woken by the
  same message, the others ask again once that window is over or once their pool frees, and
  while messages keep coming a worker asks for the next window at once instead of waiting on
  the queue first. So the messages of a window make one job, not one job per worker.
- **Small fetches of large messages**: a queue gives at most ``fetch_bytes`` per fetch (one
  message at least). A fetch is one Redis script and then one stretch of the main process's
  event loop, and both grow with the bytes taken: 50 ``train_many`` chunks (~2.4 MB) held Redis
  for 10-35 ms and the event loop for as long again, while another queue's lone message, arriving
  meanwhile, waited for both (``tests/reliability/test_noisy_neighbour.py``). At 256 KB a fetch of
  chunks still held Redis ~4.6 ms (Redis's slow log, 102 such fetches in that test) and the
  lone queue's p99 was 50-68 ms; at 128 KB, 29-35 ms. A fetch cut short by the bytes counts as
  full: the next is sent straight away.
- **Count deliveries.** The script counts how many times each message was handed out and keeps
  when it was first taken; both reach the task strategy in ``message.delivery_info``
  (``deliveries``, ``first_taken``). A live worker that gives a message back (a Redis fault under
  its job, a warm shutdown, a lost connection, a fetch it never read) takes the count back in the
  script that pushes the message back: only a delivery whose worker went away counts
  (``worker/consume/redelivery.py`` owns that policy; ``ITRAIN_MAX_DELIVERIES``).
- **Refuse what is not an envelope** (not JSON, no delivery tag, larger than
  ``max_envelope_bytes``) before parsing it in Python: it is logged, recorded in a bounded list
  (``itrain:{_transport}:rejected``, sizes and reasons only) and dropped; it has no id to answer
  under and would otherwise stop the worker.
- **Lose no give-back to a lost connection**: a fetch whose reply was lost with its connection,
  or held messages whose give-back failed, are given back by the next channel once Redis answers
  (``_Orphans``), instead of returning after the visibility timeout as counted deliveries.
- **Batch the acks**: acknowledged tags are removed in one script (``lua/ack.lua``) on a short
  one-shot timer or when many are waiting, and before anything is restored.
- **Ack only one's own delivery**: a message keeps its delivery tag when it is redelivered, so an
  ack names the delivery by the time it was taken as well (the score of its unacked record); a
  late ack from a worker cut off from Redis past the visibility timeout leaves the record of the
  worker that holds the message now, as a late give-back does.
- **Reuse one Redis client** per channel for acks, restores and event publishing.
- **Subscribe again when the pub/sub connection is reopened** (``_PubSub``): kombu's subclient
  did not, and a worker whose connection redis-py reopened after a failover waited on it forever.
- **Leave compressed bodies compressed**: kombu would inflate them before any of our code runs (a
  zlib bomb in the worker's memory); the worker refuses them by their header instead.

It is chosen by the worker's Celery app only, through the URL schemes ``itrain://`` and
``itrains://`` (TLS) that this module registers; nothing of kombu is patched, so Flower and every
other process importing kombu keep the stock transport. Written against kombu 5.7 (pinned); the
hooks it overrides are tested directly in ``tests/integration/test_transport.py``.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, suppress
from os import getpid
from socket import gethostname
from ssl import CERT_REQUIRED
from time import monotonic, time
from typing import Any

import orjson
import redis
from celery.app.amqp import AMQP
from kombu import Connection  # type: ignore[attr-defined]
from kombu.transport import TRANSPORT_ALIASES, virtual
from kombu.transport import redis as kombu_redis
from kombu.utils.json import dumps, loads
from kombu.utils.objects import cached_property

from producer.demotion import DemotionAwareConnection, DemotionAwareSSLConnection
from producer.keys import TRANSPORT_REJECTED
from worker.consume.fetch_window import FetchWindow
from worker.consume.turns import pool_has_room, when_room
from worker.lua import load_lua

__all__ = [
    "ACK",
    "AMQP_CLASS",
    "FETCH",
    "GATHER",
    "ORPHANS",
    "POOL_FETCHED",
    "Channel",
    "QoS",
    "Transport",
    "UnreadableEnvelope",
    "transport_url",
]

logger = logging.getLogger("itrain.transport")

#: URL scheme of this transport -> the Redis scheme it stands for.
SCHEMES = {"itrain": "redis", "itrains": "rediss"}
for _scheme in SCHEMES:
    TRANSPORT_ALIASES[_scheme] = f"{__name__}:Transport"


def transport_url(url: str) -> str:
    """The worker's broker URL for a Redis URL: ``redis://h/0`` -> ``itrain://h/0``."""
    for ours, theirs in SCHEMES.items():
        if url.startswith(theirs + "://"):
            return ours + url[len(theirs) :]
    return url


def as_redis_url(url: str) -> str:
    """The inverse of ``transport_url``: what Flower's broker pages and humans are shown."""
    for ours, theirs in SCHEMES.items():
        if url.startswith(ours + "://"):
            return theirs + url[len(ours) :]
    return url


class _Orphans:
    """Fetches this process took and could not give back itself: a fetch whose reply was lost
    with its connection, or held messages whose give-back failed (Redis unreachable). Each is
    named by its score (the time sent with the fetch, shared by every message it took), so a
    later channel, once Redis answers again, gives them back without counting a delivery
    (``QoS.give_back_fetch``). Without this they would return after the visibility timeout as
    deliveries that counted, as if their worker had died."""

    def __init__(self) -> None:
        self._scores: set[float] = set()
        self._lock = threading.Lock()

    def add(self, scores: Iterable[float]) -> None:
        with self._lock:
            self._scores.update(score for score in scores if score > 0)

    def take(self) -> set[float]:
        with self._lock:
            scores, self._scores = self._scores, set()
        return scores

    def __bool__(self) -> bool:
        return bool(self._scores)


ORPHANS = _Orphans()

#: Queues this worker's pool processes fetch themselves (``ITRAIN_POOL_FETCH``,
#: ``worker.consume.pool_fetch``): the main process's channels wait on and fetch the others only.
POOL_FETCHED: set[str] = set()


class _Script:
    """A Lua script sent by ``EVALSHA`` on a raw connection (the consumer's connection is driven
    by hand: ``send_command`` now, ``parse_response`` when the event loop finds it readable)."""

    def __init__(self, name: str) -> None:
        self.text = load_lua("worker.consume", name)
        self.sha = hashlib.sha1(self.text.encode()).hexdigest()


ACK = _Script("ack")
FETCH = _Script("fetch")
GATHER = _Script("gather")
GIVEBACK = _Script("giveback")
RESTORE = _Script("restore")
TALLY = _Script("tally")


class UnreadableEnvelope(ValueError):
    """An envelope kombu cannot turn into a message (e.g. a body that is not base64)."""


class Message(virtual.Message):
    """kombu's message, minus the inflation of compressed bodies (see the module docstring)."""

    def __init__(self, payload: dict[str, Any], channel: Any = None, **kwargs: Any) -> None:
        headers = payload.get("headers")
        compression = headers.pop("compression", None) if isinstance(headers, dict) else None
        try:
            super().__init__(payload, channel, **kwargs)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:  # binascii.Error too
            raise UnreadableEnvelope(f"{type(exc).__name__}: {exc}") from None
        if compression is not None:
            self.headers["compression"] = compression


class QoS(kombu_redis.QoS):
    """Unacked bookkeeping: records written by the fetch script, acks batched."""

    #: Seconds an ack may wait for others to share its round trip.
    ack_delay = 0.005
    #: Acks flushed at once when this many are waiting.
    ack_batch = 256

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        #: Tags whose unacked record the fetch script already wrote.
        self.recorded: set[str] = set()
        #: When this worker took each message it holds (the score of its unacked record): a
        #: give-back pushes a message only while the record is still this delivery's.
        self.taken_at: dict[str, float] = {}
        #: Acknowledged deliveries waiting for a flush: tag, and the score it was taken with
        #: (``None``: this worker no longer holds that delivery).
        self._acks: list[tuple[str, float | None]] = []
        self._ack_lock = threading.Lock()
        self._ack_tref: Any = None
        #: The queue each held message was taken from, and how many each queue holds: a queue's
        #: share of the prefetch window (``Channel._fetch_caps``).
        self.queue_of: dict[str, str] = {}
        self.held: dict[str, int] = {}

    def hold(self, delivery_tag: str, queue: str) -> None:
        """Count a message taken from ``queue`` against that queue's share of the window."""
        self.queue_of[delivery_tag] = queue
        self.held[queue] = self.held.get(queue, 0) + 1

    def release(self, delivery_tag: str) -> None:
        """The message left the worker's hands (acked, rejected or given back)."""
        queue = self.queue_of.pop(delivery_tag, None)
        if queue is not None:
            left = self.held.get(queue, 0) - 1
            if left > 0:
                self.held[queue] = left
            else:
                self.held.pop(queue, None)

    def append(self, message: Any, delivery_tag: str) -> None:
        if delivery_tag in self.recorded:
            self.recorded.discard(delivery_tag)
        else:  # basic_get or a message handed back: kombu's two-step record, its score kept
            now = time()
            delivery = message.delivery_info
            record = dumps([message._raw, delivery["exchange"], delivery["routing_key"]])
            with self.channel.conn_or_acquire() as client:
                client.pipeline().zadd(self.unacked_index_key, {delivery_tag: now}).hset(
                    self.unacked_key, delivery_tag, record
                ).execute()
            self.taken_at[delivery_tag] = now
        virtual.QoS.append(self, message, delivery_tag)

    def ack(self, delivery_tag: str) -> None:
        virtual.QoS.ack(self, delivery_tag)  # frees the prefetch slot now
        # The ack removes only this delivery's record (``lua/ack.lua``): the score it was taken
        # with says which delivery that is.
        score = self.taken_at.pop(delivery_tag, None)
        self.release(delivery_tag)
        with self._ack_lock:
            self._acks.append((delivery_tag, score))
            waiting = len(self._acks)
        transport = self.channel.connection
        # After a broker loss the channel is closed (no transport): ack at once, best effort.
        hub = transport.hub if transport is not None else None
        if hub is None or waiting >= self.ack_batch:
            self.flush_acks()
        elif self._ack_tref is None:
            self._ack_tref = hub.call_later(self.ack_delay, self.flush_acks)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        self.flush_acks()
        if requeue:
            self.restore_by_tag(delivery_tag, leftmost=True)
        else:  # forgotten as an ack is: only while the record is still this delivery's
            score = self.taken_at.get(delivery_tag)
            if score is not None:
                with self.channel.conn_or_acquire() as client:
                    self._forget_acked(client, [(delivery_tag, score)])
        virtual.QoS.ack(self, delivery_tag)
        self.taken_at.pop(delivery_tag, None)
        self.release(delivery_tag)

    def give_back_fetches(self, scores: set[float], client: Any) -> int:
        """Give back every message still recorded with one of ``scores`` (``_Orphans``)."""
        rows: list[tuple[Any, float]] = []
        for score in scores:
            tags = client.zrange(self.unacked_index_key, score, score, byscore=True)
            rows += [(tag, score) for tag in tags]
        back = 0
        for i in range(0, len(rows), 500):
            back += self._restore_rows(client, rows[i : i + 500], undo=True, leftmost=False)
        return back

    def restore_by_tag(self, tag: str, client: Any = None, leftmost: bool = False) -> None:
        """Give one held message back (``reject(requeue=True)``: a Redis fault under its job).
        Its delivery count is taken back in the same script: see ``give_back``."""
        with self.channel.conn_or_acquire(client) as conn:
            self.give_back([tag], conn, leftmost=leftmost)

    def give_back(self, tags: list[str], client: Any, *, leftmost: bool = False) -> int:
        """Give messages this worker holds back to their queues, at the consuming end (first in
        line) or, with ``leftmost``, at the far end. A give-back by a live worker is not a
        delivery: the script that pushes the message back also takes its delivery count back
        (``lua/restore.lua``), so Redis faults, warm shutdowns and lost connections never bring a
        valid message nearer ``ITRAIN_MAX_DELIVERIES`` (``worker/consume/redelivery.py``)."""
        back = 0
        for i in range(0, len(tags), 500):  # bounded scripts, however many are held
            part = tags[i : i + 500]
            # This delivery's score: a record swept back after the visibility timeout and taken
            # again by another worker has a newer one, and is left to that worker.
            scores: list[float | None] = [self.taken_at.get(tag) for tag in part]
            unknown = [tag for tag, score in zip(part, scores, strict=True) if score is None]
            if unknown:  # a message kombu recorded itself (basic_get): read its score
                read = iter(client.zmscore(self.unacked_index_key, unknown))
                scores = [next(read) if score is None else score for score in scores]
            rows = [(tag, score) for tag, score in zip(part, scores, strict=True) if score is not None]
            if rows:
                back += self._restore_rows(client, rows, undo=True, leftmost=leftmost)
        return back

    def flush_acks(self) -> None:
        """Remove every acknowledged delivery's records in one script (``lua/ack.lua``), each
        only while it is still that delivery's: a message swept back after the visibility timeout
        and taken by another worker keeps its delivery tag, and a late ack from the first worker
        (cut off from Redis meanwhile) must not remove the new holder's record. On a connection
        error they are kept for the next flush (worst case: redelivered after the visibility
        timeout, and answered ``duplicate``)."""
        with self._ack_lock:
            acks, self._acks = self._acks, []
            tref, self._ack_tref = self._ack_tref, None
        if tref is not None:
            tref.cancel()
        # A tag without a score is not held by this delivery any more (given back by a warm
        # shutdown or a lost connection before its ack): its record, if any, is another's.
        rows = [(tag, score) for tag, score in acks if score is not None]
        if not rows:
            return
        channel = self.channel
        try:
            with channel.conn_or_acquire() as client:
                self._forget_acked(client, rows)
        except channel.connection_errors as exc:
            logger.warning("could not flush %d ack(s) (%r); retried with the next ones", len(rows), exc)
            with self._ack_lock:
                self._acks[:0] = rows

    def ack_arguments(self, rows: list[tuple[str, float]]) -> tuple[list[str], list[str]]:
        """The keys and arguments of ``lua/ack.lua`` forgetting the records of ``rows`` (tag, the
        score its delivery was taken with)."""
        channel = self.channel
        keys = [self.unacked_index_key, self.unacked_key, channel.deliveries_key, channel.first_taken_key]
        return keys, [tag for tag, _ in rows] + [repr(float(score)) for _, score in rows]

    def _forget_acked(self, client: Any, rows: list[tuple[str, float]]) -> int:
        """Forget the records of ``rows`` (tag, the score its delivery was taken with) that are
        still recorded with that score; how many were."""
        gone = 0
        for i in range(0, len(rows), 500):  # bounded scripts, however many acks waited
            keys, args = self.ack_arguments(rows[i : i + 500])
            try:
                gone += int(client.evalsha(ACK.sha, len(keys), *keys, *args))
            except redis.exceptions.NoScriptError:  # a restarted Redis forgot it
                gone += int(client.eval(ACK.text, len(keys), *keys, *args))
        return gone

    def restore_visible(self, start: int = 0, num: int | None = 10, interval: int = 10) -> None:
        """Give back the messages taken more than ``visibility_timeout`` seconds ago and never
        acked (their worker died): one atomic script per sweep (``lua/restore.lua``), no mutex."""
        self._vrestore_count += 1
        if (self._vrestore_count - 1) % (interval or 1):
            return
        self.flush_acks()  # our own acked messages are not to come back
        channel = self.channel
        with channel.conn_or_acquire() as client:
            ceil = time() - self.visibility_timeout
            rows = client.zrange(
                self.unacked_index_key, ceil, 0, desc=True, byscore=True,
                offset=num and start, num=num, withscores=True,
            )  # fmt: skip
            if not rows:
                return
            back = 0
            for i in range(0, len(rows), 500):  # bounded scripts, however large the backlog
                # Their worker went away without a verdict: that delivery counts.
                back += self._restore_rows(client, rows[i : i + 500], undo=False, leftmost=False)
        if back:
            logger.warning(
                "restored %d message(s) not acknowledged within %g s", back, self.visibility_timeout
            )

    def _restore_rows(self, client: Any, rows: list[tuple[Any, float]], *, undo: bool, leftmost: bool) -> int:
        """Push back the messages of ``rows`` (tag, score as read) still recorded with that score
        (``lua/restore.lua``); ``undo`` takes their delivery count back."""
        channel = self.channel
        records = client.hmget(self.unacked_key, [tag for tag, _ in rows])
        keys: list[str] = [
            self.unacked_index_key,
            self.unacked_key,
            channel.deliveries_key,
            channel.first_taken_key,
        ]
        args: list[Any] = ["1" if undo else "0", "L" if leftmost else "R"]
        for (tag, score), record in zip(rows, records, strict=True):
            lists = _restore_lists(channel, record)
            text = b"" if lists is None else lists[1]
            targets = [] if lists is None else lists[0]
            args += [tag, repr(float(score)), text, len(targets)]
            for key in targets:
                if key not in keys:
                    keys.append(key)
                args.append(keys.index(key) + 1)
        return int(client.eval(RESTORE.text, len(keys), *keys, *args))

    def restore_unacked(self, client: Any = None) -> None:
        """Give unacknowledged messages back (worker shutdown, lost connection). Acked ones are
        skipped: their records may still be waiting for a flush. A failure is logged, not raised:
        the messages are safe in the unacked hash and return after the visibility timeout, and a
        raise here would stop the worker on a broker loss."""
        try:
            self.flush_acks()
            with self.channel.conn_or_acquire(client) as conn:
                # Pushed at the consuming end in reverse: the first delivered is first in line.
                held = [tag for tag in self._delivered if tag not in self._dirty]
                self.give_back(held[::-1], conn)
                self.taken_at.clear()
        except Exception as exc:
            # Given back by a later channel once Redis answers (or after the visibility timeout).
            ORPHANS.add({self.taken_at[tag] for tag in self._delivered if tag in self.taken_at})
            logger.warning(
                "could not give %d unacknowledged message(s) back to the broker (%r); "
                "they go back once Redis answers again",
                len(self._delivered),
                exc,
            )
        self._delivered.clear()
        self.queue_of.clear()
        self.held.clear()

    def restore_unacked_once(self, stderr: Any = None) -> Any:
        with suppress(Exception):
            self.flush_acks()
        return super().restore_unacked_once(stderr)


class _PubSub(redis.client.PubSub):
    """redis-py's ``PubSub`` that re-subscribes whenever its connection is (re)connected, however
    that connection was given to it.

    redis-py registers ``on_connect`` (which re-issues the subscriptions) only when ``PubSub``
    takes a connection from the pool itself, in ``execute_command``. kombu's poller hands the
    subclient its connection directly (``MultiChannelPoller._client_registered`` assigns
    ``client.connection``) before the first ``PSUBSCRIBE``, so the callback was never registered.
    When a read on the pub/sub connection then failed (a master stopped for a minute, then demoted),
    redis-py's retry reconnected it, to the new master, without subscribing, and read again with no
    timeout: the worker's event loop waited forever for a message that could not come."""

    _connection: Any = None

    @property
    def connection(self) -> Any:
        return self._connection

    @connection.setter
    def connection(self, connection: Any) -> None:
        old = self._connection
        if old is not None and old is not connection:
            old.deregister_connect_callback(self.on_connect)
        self._connection = connection
        if connection is not None:
            connection.register_connect_callback(self.on_connect)  # idempotent


class _Waiter:
    """One connection blocked in ``BLMOVE q q RIGHT RIGHT`` on one queue (``_Waiters``)."""

    __slots__ = ("connection", "fd", "sent_at")

    def __init__(self, connection: Any) -> None:
        self.connection = connection
        self.fd: int | None = None
        #: When the pending wait was sent (None: no reply awaited).
        self.sent_at: float | None = None


class _Waiters:
    """How a channel consuming several queues waits for a message on any of them.

    ``BLMOVE`` watches one list, and every command that blocks on several (``BRPOP``,
    ``BLMPOP``) removes the message it returns: a worker that died with that reply in flight would
    lose it. So each queue gets its own connection blocked in ``BLMOVE q q RIGHT RIGHT``, which
    leaves the list as it was, all watched by the worker's event loop; the first to answer makes
    the channel fetch (``fetch.lua``, which takes and records in one step) from every queue. The
    consumer connection only fetches. A worker on one queue waits on its consumer connection, as
    before."""

    #: Seconds past a wait's server timeout after which its connection is taken for dead (a
    #: half-open socket answers nothing and no socket timeout applies to the event loop).
    overdue = 10.0

    def __init__(self, channel: Channel) -> None:
        self.channel = channel
        self.waiters: dict[str, _Waiter] = {}

    @property
    def usable(self) -> bool:
        transport = self.channel.connection
        return transport is not None and getattr(transport, "hub", None) is not None

    def arm(self, queues: list[str], timeout: float) -> None:
        """Make sure a wait is pending on each of ``queues``."""
        hub = self.channel.connection.hub
        now = monotonic()
        for queue in queues:
            waiter = self.waiters.get(queue)
            if waiter is not None and waiter.sent_at is not None:
                if now - waiter.sent_at > (timeout or self.overdue) + self.overdue:
                    logger.warning(
                        "no reply to a wait on %s for %.0f s; reconnecting", queue, now - waiter.sent_at
                    )
                    self._drop(queue)
                continue
            if waiter is None:
                # Not counted in the pool's limit: these connections are never handed out.
                pool = self.channel.client.connection_pool
                waiter = self.waiters[queue] = _Waiter(pool.connection_class(**pool.connection_kwargs))
            try:
                connection = waiter.connection
                if connection._sock is None:
                    connection.connect()
                    waiter.fd = None
                if waiter.fd is None:
                    waiter.fd = connection._sock.fileno()
                    hub.add_reader(waiter.fd, self._on_readable, queue)
                key = self.channel._q_for_pri(queue, 0)
                connection.send_command("BLMOVE", key, key, "RIGHT", "RIGHT", timeout or 0)
                waiter.sent_at = now
            except self.channel.connection_errors as exc:
                # The consumer connection meets the same fault on its next fetch and reconnects.
                logger.debug("could not wait on %s (%r)", queue, exc)
                self._drop(queue)
                self.channel._fetch_next = True

    def _on_readable(self, queue: str) -> None:
        waiter = self.waiters.get(queue)
        if waiter is None:
            return
        try:
            reply = waiter.connection.read_response()
        except Exception as exc:  # a lost connection, READONLY or -UNBLOCKED after a demotion
            logger.debug("wait on %s ended (%r)", queue, exc)
            self._drop(queue)
            self.channel._fetch_next = True
            return
        waiter.sent_at = None
        # A message arrived (or the wait timed out): fetch from every queue on the event loop's
        # next turn, or once the fetch window is over.
        if reply is None:
            self.channel._fetch_next = True
        else:
            self.channel._woken(queue)

    def _drop(self, queue: str) -> None:
        waiter = self.waiters.pop(queue, None)
        if waiter is None:
            return
        hub = getattr(self.channel.connection, "hub", None)
        if waiter.fd is not None and hub is not None:
            with suppress(Exception):
                hub.remove_reader(waiter.fd)
        with suppress(Exception):
            waiter.connection.disconnect()

    def close(self) -> None:
        for queue in list(self.waiters):
            self._drop(queue)


class Channel(kombu_redis.Channel):
    QoS = QoS
    Message = Message
    # A master demoted behind a stable address answers READONLY or -UNBLOCKED: reconnect.
    connection_class = DemotionAwareConnection
    connection_class_ssl = DemotionAwareSSLConnection

    #: Messages taken in one fetch at most (the measured sweet spot is 25-50: larger fetches hold
    #: Redis longer for little gain).
    fetch_max = 50
    #: Bytes a queue gives in one fetch at most (one message at least): ~2-3 ``train_many`` chunks
    #: of 256 events; 50 small messages stay well under it.
    fetch_bytes = 128 * 1024
    #: An envelope larger than this is refused before it is parsed (headers included).
    max_envelope_bytes = 2 * 1024 * 1024
    deliveries_key = "unacked_deliveries"
    first_taken_key = "unacked_first_taken"
    rejected_key = TRANSPORT_REJECTED
    rejected_max = 1000
    #: Seconds without fetching after Redis refused a fetch (OOM, READONLY, LOADING, BUSY).
    refused_backoff = 0.5
    #: Seconds one wait lasts when a channel on several queues has no event loop to watch them
    #: all at once (``_Waiters``): it waits on each queue in turn.
    poll_wait = 0.02
    #: The longest wait between a wake-up and its fetch while messages come fast, seconds
    #: (``worker.consume.fetch_window``; 0: fetch at once, always).
    fetch_window = 0.0
    #: A queue's gather key (``lua/gather.lua``): which worker gathers its messages now.
    gather_key = "itrain:{_transport}:gather:%s"
    #: When a queue's last window ends (``lua/gather.lua``: windows tile time).
    gather_end_key = "itrain:{_transport}:gather-end:%s"
    #: Seconds a worker that found another gathering waits past the end of that window before it
    #: asks again: time for the other's fetch to take what came.
    gather_margin = 0.001
    #: How fast a queue's messages are taken by its pool fetchers together (``lua/tally.lua``).
    tally_key = "itrain:{_transport}:tally:%s"

    from_transport_options = (  # type: ignore[assignment]
        *kombu_redis.Channel.from_transport_options,
        "fetch_max",
        "fetch_bytes",
        "max_envelope_bytes",
        "deliveries_key",
        "first_taken_key",
        "rejected_key",
        "rejected_max",
        "fetch_window",
    )

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._shared: redis.Redis | None = None
        #: ("WAIT" | "FETCH", keys) of the reply awaited on the consumer connection.
        self._pending: tuple[str, list[str]] | None = None
        #: Fetch instead of waiting: messages are likely waiting (start, a full fetch, a wake-up).
        self._fetch_next = True
        self._quiet_until = 0.0
        #: No fetch before this (monotonic): a fetch window is open (``_woken``).
        self._fetch_after = 0.0
        self._script_loaded = False
        #: The time sent with the last fetch: the score of what it took.
        self._fetch_at = 0.0
        self._waiters = _Waiters(self)
        #: This channel's name in a gather key (for whoever reads it).
        self._node = f"{gethostname()}:{getpid()}:{id(self):x}"
        #: When the last window was asked for (monotonic): a window starts when it is asked for,
        #: not when the answer comes back (a round trip later, on a link to another host).
        self._asked_at = 0.0
        #: A wake-up was passed over because the pool was busy (``_woken``): wait on the queue
        #: again when it frees.
        self._passing = False
        #: The last fetch took some: while messages come fast, ask for the next window at once
        #: instead of waiting on the queue (``_claiming_delay``).
        self._claiming = False
        super().__init__(*args, **kwargs)
        if self.global_keyprefix:
            raise ValueError("the itrain transport does not support global_keyprefix")
        self._window = FetchWindow(float(self.fetch_window))

    # -- one client, reused ---------------------------------------------------------------------

    @contextmanager
    def conn_or_acquire(self, client: Any = None) -> Iterator[Any]:
        if client:
            yield client
            return
        if self._shared is None:
            self._shared = self._create_client()
        yield self._shared

    @cached_property
    def subclient(self) -> Any:
        """The fanout (``celery.pidbox``) pub/sub client: kombu's, resubscribing on reconnect."""
        client = self._create_client(asynchronous=True)
        return _PubSub(client.connection_pool, event_dispatcher=client._event_dispatcher)

    def _disconnect_pools(self) -> None:
        self._shared = None  # after a fork or at close: the next use makes a new one
        super()._disconnect_pools()

    def _connparams(self, asynchronous: bool = False) -> dict[str, Any]:
        params: dict[str, Any] = super()._connparams(asynchronous)
        conninfo = self.connection.client
        if conninfo.transport_cls == "itrains" and not conninfo.ssl:
            # rediss:// without ssl_* options: verify the server against the system's CAs
            # (kombu's default for rediss:// is not to verify at all).
            base = params["connection_class"]
            if not issubclass(base, redis.SSLConnection):
                params["connection_class"] = type("SSLConnection", (redis.SSLConnection, base), {})
            params["ssl_cert_reqs"] = CERT_REQUIRED
        return params

    # -- consuming ------------------------------------------------------------------------------

    def _fetch_caps(self, queues: list[str]) -> list[int]:
        """How many messages each of ``queues`` may give now: its free share of the prefetch
        window, or 0 while less than a quarter of that share is free (otherwise a busy worker
        degrades to one fetch per ack). The window is shared equally between the queues this
        channel consumes, so a flooded queue never fills it and keeps the others' messages out."""
        prefetch = self.qos.prefetch_count
        if not prefetch:  # no prefetch limit
            return [int(self.fetch_max)] * len(queues)
        share = max(1, prefetch // max(1, len(self.active_queues)))
        floor = max(1, share // 4)
        held = self.qos.held
        caps = []
        for queue in queues:
            free = share - held.get(queue, 0)
            caps.append(free if free >= floor else 0)
        return caps

    def _brpop_start(self, timeout: float | None = None) -> None:
        # Called on every loop tick: it must do nothing while a reply is pending.
        now = monotonic()
        if self._in_poll or now < self._quiet_until or now < self._fetch_after:
            return
        if ORPHANS:
            self._give_back_orphans()
        queues = self._queue_cycle.consume(len(self.active_queues))
        if POOL_FETCHED:  # those the pool processes fetch themselves (``pool_fetch``)
            queues = [queue for queue in queues if queue not in POOL_FETCHED]
        if not queues:
            return
        caps = self._fetch_caps(queues)
        room = [queue for queue, cap in zip(queues, caps, strict=True) if cap > 0]
        if not room:  # every queue's share is in use: the next ack makes room
            return
        wait = self.brpop_timeout if timeout is None else timeout
        if self._fetch_next:
            self._send_fetch(room, [cap for cap in caps if cap > 0])
        elif len(queues) == 1:
            delay = self._claiming_delay(now)
            if delay > 0:
                self._claim(room[0], now, delay)
            else:
                self._send_wait(room[0], wait)
        elif self._waiters.usable:
            self._waiters.arm(room, wait)
        else:  # no event loop to watch several connections: short waits, queue after queue
            self._send_wait(room[0], min(wait, self.poll_wait) if wait else self.poll_wait)

    def _woken(self, queue: str) -> None:
        """A wait on ``queue`` answered with a message: fetch on the loop's next turn, or, while
        messages come fast enough to gather a few (``FetchWindow``), once the window is over: one
        fetch and one pool job for all that came in it. Without an event loop (no timer) it
        fetches at once.

        Every idle worker of a queue is woken by the same message, and two workers each gathering
        half of a window pay twice the fetches, pool jobs and locks. So on a queue of its own, a
        worker whose pool has a free process asks to gather (``lua/gather.lua``): one worker at a
        time does, and the others wait on the queue again once its window is over
        (``_gathered``). A worker whose pool is busy leaves the window to the others: here its
        messages would wait for that pool's job (``_passed``)."""
        self._fetch_next = True
        now = monotonic()
        if now < self._fetch_after:  # a window is open already
            return
        hub: Any = getattr(self.connection, "hub", None)
        delay = self._window.delay(now) if hub is not None else 0.0
        if delay <= 0:
            return
        if len(self.active_queues) > 1 or self._in_poll:
            # Several queues: this worker gathers its own window. Its pool takes turns between
            # the queues (``turns``), and a flood on one keeps its pool busy: passing over the
            # others' wake-ups would hold back exactly the messages the turns are for.
            self._open_window(now, delay)
            return
        self._claim(queue, now, delay)

    def _claiming_delay(self, now: float) -> float:
        """The window to ask for instead of waiting on the queue, or 0 (wait). While messages
        come fast on a queue of its own, a worker whose last fetch took some asks to gather the
        next window at once: waiting for a message first would cost a round trip and a wake-up
        per window, for a message that is on its way. A fetch that takes nothing turns this off
        until a wait is answered again."""
        hub: Any = getattr(self.connection, "hub", None)
        if not self._claiming or hub is None or len(self.active_queues) != 1:
            return 0.0
        return self._window.delay(now)

    def _claim(self, queue: str, now: float, delay: float) -> None:
        """Ask to gather ``queue``'s next ``delay`` seconds (``lua/gather.lua``), unless the pool is
        busy (``_passed``)."""
        if not pool_has_room():
            self._passed(now, delay)
            return
        self._asked_at = now
        keys = [self.gather_key % queue, self.gather_end_key % queue]
        self._load_scripts()
        self._send("GATHER", keys, "EVALSHA", GATHER.sha, 2, *keys, self._node, max(1, round(delay * 1000)))

    def _passed(self, now: float, delay: float) -> None:
        """A wake-up while the pool is busy: no fetch; wait on the queue again as soon as the
        pool frees (``_room``), or once the window's time is over, whichever comes first. A
        worker whose pool is free gathers what comes meanwhile; with none, the first to free
        does."""
        self._fetch_next = False
        self._passing = True
        self._open_window(now, delay)
        when_room(self._room)

    def _gathered(self, reply: Any) -> None:
        """The answer to a gather request: this worker's window (``lua/gather.lua`` may shorten
        it so that windows tile time: wait out what is left of it, counted from when it was
        asked for, then fetch), or what is left of another worker's (that one fetches what comes
        in it: ask again once it is over)."""
        if reply is _REFUSED or not isinstance(reply, list) or len(reply) != 2:
            self._fetch_next = True
            return
        ours, ms = int(reply[0]), int(reply[1])
        now = monotonic()
        if ours:
            self._fetch_next = True
            left = self._asked_at + ms / 1000.0 - now
            if left > 0:
                self._open_window(now, left)
            return
        self._fetch_next = False
        self._window.others_gather(now)
        self._open_window(now, ms / 1000.0 + self.gather_margin)

    def _open_window(self, now: float, seconds: float) -> None:
        self._fetch_after = now + seconds
        self.connection.hub.call_later(seconds, self._window_over)

    def _room(self) -> None:
        """The pool has a free process again: a wake-up passed over for it waits on the queue
        now, without waiting for the rest of its window."""
        if self._passing:
            self._passing = False
            self._fetch_after = 0.0
            self._window_over()

    def _window_over(self) -> None:
        # The loop may have ticked a moment before the window ended and found nothing to do:
        # start the fetch from here, as a loop tick would (registering the connection again if
        # it was lost meanwhile).
        self._passing = False
        if not self.closed and not self._in_poll:
            self.connection.poll_now()

    def _send_wait(self, queue: str, timeout: float) -> None:
        key = self._q_for_pri(queue, 0)
        self._send("WAIT", [key], "BLMOVE", key, key, "RIGHT", "RIGHT", timeout or 0)

    def _send_fetch(self, queues: list[str], caps: list[int]) -> None:
        """Take up to ``fetch_max`` messages, shared fairly between ``queues`` (``fetch.lua``),
        each queue giving at most its cap, and at most ``fetch_bytes`` (one message at least)."""
        want = min(int(self.fetch_max), sum(caps))
        estimate = self.qos.can_consume_max_estimate()
        if estimate is not None:
            want = min(want, estimate)
        if want <= 0:
            return
        self._fetch_at = now = time()
        self._load_scripts()
        lists, keys, args = self.fetch_arguments(queues, caps, want, now)
        self._send("FETCH", lists, "EVALSHA", FETCH.sha, len(keys), *keys, *args)
        if len(queues) > 1:
            # The next fetch starts with the next queue: a share's remainder goes round too.
            self._queue_cycle.rotate(queues[0])

    def fetch_arguments(
        self, queues: list[str], caps: list[int], want: int, now: float
    ) -> tuple[list[str], list[str], list[Any]]:
        """The lists a fetch takes from, and the keys and arguments of ``lua/fetch.lua`` taking up to
        ``want`` messages from ``queues`` (each at most its cap) with the time ``now`` as their
        score."""
        lists = [self._q_for_pri(q, pri) for pri in self.priority_steps for q in queues]
        names = [q for _ in self.priority_steps for q in queues]
        keys = [
            self.unacked_index_key,
            self.unacked_key,
            self.deliveries_key,
            self.first_taken_key,
            self.rejected_key,
            *lists,
        ]
        args = [
            want,
            now,
            int(self.max_envelope_bytes),
            int(self.rejected_max),
            int(self.fetch_bytes),
            len(queues),
            *caps,
            *names,
        ]
        return lists, keys, args

    def _load_scripts(self) -> None:
        """The consumer connection's scripts, loaded once (again after a Redis restart)."""
        if not self._script_loaded:
            self.client.script_load(FETCH.text)
            self.client.script_load(GATHER.text)
            self._script_loaded = True

    def _give_back_orphans(self) -> None:
        scores = ORPHANS.take()
        try:
            with self.conn_or_acquire() as client:
                back = self.qos.give_back_fetches(scores, client)
        except Exception as exc:
            ORPHANS.add(scores)
            self._quiet_until = monotonic() + self.refused_backoff
            logger.debug("could not give back lost fetches yet (%r)", exc)
            return
        if back:
            logger.warning("gave back %d message(s) of fetches lost with a connection", back)

    def _send(self, kind: str, keys: list[str], *command: Any) -> None:
        connection = self.client.connection
        self._in_poll = connection
        self._brpop_sent_at = monotonic()  # type: ignore[assignment]
        self._pending = (kind, keys)
        connection.send_command(*command)

    def _brpop_read(self, **options: Any) -> bool:
        pending = self._pending
        try:
            reply = self._read_reply(**options)
        finally:
            self._in_poll = None  # type: ignore[assignment]
            self._pending = None
            self._flush_brpop_reauth()
        if pending is None:
            raise virtual.Empty()
        kind, keys = pending
        if kind == "WAIT":
            # A message arrived, or the wait timed out: fetch now (or after the fetch window). A
            # timeout fetches too, for the priority lists and for messages restored after a
            # visibility timeout.
            if reply and reply is not _REFUSED:
                self._woken(keys[0].rsplit(self.sep, 1)[0])
            else:
                self._fetch_next = True
            if len(self.active_queues) > 1:  # short waits, queue after queue (no event loop)
                self._queue_cycle.rotate(keys[0].rsplit(self.sep, 1)[0])
            if reply is not _REFUSED:
                self._brpop_start()
            raise virtual.Empty()
        if kind == "GATHER":
            self._gathered(reply)
            if reply is not _REFUSED:
                self._brpop_start()
            raise virtual.Empty()
        if reply is _REFUSED or not reply:
            self._fetch_next = self._claiming = False
            raise virtual.Empty()
        taken = len(reply) // 5
        self._claiming = True
        # Full, or a queue stopped at its bytes: more is likely waiting.
        self._fetch_next = taken >= self.fetch_max or self._bytes_reached(reply, keys)
        self._window.taken(taken, monotonic())
        self._deliver_fetched(reply, keys)
        return True

    def _bytes_reached(self, reply: list[Any], lists: list[str]) -> bool:
        """Whether a queue gave ``fetch_bytes`` in this fetch (``fetch.lua`` stopped it there)."""
        given: dict[str, int] = {}
        for i in range(0, len(reply), 5):
            queue = lists[int(reply[i]) - 1].rsplit(self.sep, 1)[0]
            given[queue] = given.get(queue, 0) + len(reply[i + 4])
        return any(n >= self.fetch_bytes for n in given.values())

    def _read_reply(self, **options: Any) -> Any:
        try:
            return self.client.parse_response(self.client.connection, "EVALSHA", **options)
        except self.connection_errors:
            # Disconnect so that the next loop tick reconnects. A fetch whose reply is lost here
            # may have left its messages recorded: they are given back once Redis answers.
            self._lost_fetch()
            self.client.connection.disconnect()
            raise
        except redis.exceptions.NoScriptError:
            self._script_loaded = False  # Redis restarted and forgot it; loaded again next time
            self._fetch_next = True
            return _REFUSED
        except self.ResponseError as exc:
            # OOM (BLMOVE is refused when Redis is full; the fetch is not), READONLY, LOADING,
            # BUSY: not the messages' fault. Fetch directly after a pause.
            logger.warning(
                "Redis refused to hand out messages (%s); retrying in %g s", exc, self.refused_backoff
            )
            self._quiet_until = monotonic() + self.refused_backoff
            self._fetch_next = True
            return _REFUSED

    def fetched_envelope(
        self, reply: list[Any], i: int, lists: list[str]
    ) -> tuple[str, str, dict[str, Any]] | None:
        """Item ``i`` (its first of five values) of a fetch script's reply as (delivery tag, queue,
        envelope), the envelope's ``delivery_info`` holding its delivery count, when it was first
        taken and the queue it was taken from; None for an item that is not a message envelope
        (logged, and its unacked record, if any, forgotten)."""
        key, tag, count, text = lists[int(reply[i]) - 1], reply[i + 1], int(reply[i + 2]), reply[i + 4]
        if not tag:
            logger.error(
                "dropped a queue item of %s that is not a message envelope: %s",
                key,
                text.decode(errors="replace")[:300],
            )
            return None
        tag = tag.decode()
        queue = key.rsplit(self.sep, 1)[0]
        payload = _payload(text)
        if payload is None or payload["properties"]["delivery_tag"] != tag:
            logger.error("dropped a queue item of %s that kombu cannot read (delivery tag %r)", key, tag)
            self._forget(tag)
            return None
        props = payload["properties"]
        if not isinstance(props.get("delivery_info"), dict):
            props["delivery_info"] = {"exchange": "", "routing_key": queue}
        props["delivery_info"]["deliveries"] = count
        props["delivery_info"]["first_taken"] = float(reply[i + 3])
        # The queue it was taken from: its pool jobs take turns with other queues' (batching).
        props["delivery_info"]["taken_from"] = queue
        return tag, queue, payload

    def _deliver_fetched(self, reply: list[Any], lists: list[str]) -> None:
        deliver = self.connection._deliver
        recorded = self.qos.recorded
        taken_at = self.qos.taken_at
        hold, release = self.qos.hold, self.qos.release
        n = len(reply)
        for i in range(0, n, 5):
            read = self.fetched_envelope(reply, i, lists)
            if read is None:
                continue
            tag, queue, payload = read
            key = lists[int(reply[i]) - 1]
            recorded.add(tag)
            taken_at[tag] = self._fetch_at
            hold(tag, queue)  # before delivery: an ack may come within it
            try:
                deliver(payload, queue)
            except UnreadableEnvelope as exc:
                # Raised while the message object is built, before it is handed to the worker.
                recorded.discard(tag)
                taken_at.pop(tag, None)
                release(tag)
                logger.error("dropped a queue item of %s that is not a message envelope: %s", key, exc)
                self._forget(tag)
                continue
            except BaseException:
                # Never handed over: put the rest back where they were instead of leaving them to
                # the visibility timeout.
                recorded.discard(tag)
                taken_at.pop(tag, None)
                release(tag)
                self._give_back(reply[i + 5 :], lists)
                raise

    def _forget(self, tag: str) -> None:
        with self.conn_or_acquire() as client:
            pipe = client.pipeline()
            pipe.zrem(self.unacked_index_key, tag)
            pipe.hdel(self.unacked_key, tag)
            pipe.hdel(self.deliveries_key, tag)
            pipe.hdel(self.first_taken_key, tag)
            pipe.execute()

    def _give_back(self, reply: list[Any], lists: list[str]) -> int:
        """Put fetched, undelivered messages back at the consuming end (``lua/giveback.lua``)."""
        args: list[Any] = []
        for i in range(0, len(reply), 5):
            if reply[i + 1]:
                args.extend((reply[i], reply[i + 1], reply[i + 4]))
        if not args:
            return 0
        with self.conn_or_acquire() as client:
            keys = [self.unacked_index_key, self.unacked_key, self.deliveries_key, *lists]
            return int(client.eval(GIVEBACK.text, len(keys), *keys, *args))

    def _lost_fetch(self) -> None:
        if self._pending is not None and self._pending[0] == "FETCH":
            ORPHANS.add([self._fetch_at])

    def _on_connection_disconnect(self, connection: Any) -> None:
        if self._in_poll is connection:
            self._lost_fetch()
            self._pending = None
            self._fetch_next = True
        super()._on_connection_disconnect(connection)

    def close(self) -> None:
        # kombu reads a pending reply at close and delivers what it holds; a fetch's messages go
        # back to their queue instead (first in line again), a wait's reply is only read.
        if self._in_poll and self._pending is not None:
            kind, lists = self._pending
            try:
                reply = self._read_reply()
                if kind == "FETCH" and reply and reply is not _REFUSED:
                    self._give_back(reply, lists)
            except Exception:
                self._lost_fetch()
            self._in_poll = None  # type: ignore[assignment]
            self._pending = None
        self._waiters.close()
        with suppress(Exception):
            self.qos.flush_acks()
        super().close()


def _restore_lists(channel: Channel, record: bytes | None) -> tuple[list[str], bytes] | None:
    """Where an unacked record's message goes back to, and the text to push (kombu's
    ``_do_restore_message``: marked redelivered, to every queue its route names)."""
    if record is None:
        return None
    try:
        message, exchange, routing_key = loads(record)
        with suppress(KeyError, TypeError):
            message["headers"]["redelivered"] = True
            message["properties"]["delivery_info"]["redelivered"] = True
        priority = channel._get_message_priority(message, reverse=False)
        lists = [channel._q_for_pri(queue, priority) for queue in channel._lookup(exchange, routing_key)]
        # kombu's JSON (ASCII, escapes kept): a message whose header holds a lone surrogate
        # escape must come back to be refused by the worker, not vanish here.
        return lists, dumps(message).encode()
    except Exception as exc:  # a record nobody can restore: forget it rather than retry forever
        logger.error("dropped an unacknowledged record that cannot be restored: %r", exc)
        return None


#: A reply Redis refused (see ``Channel._read_reply``).
_REFUSED: Any = object()


def _payload(text: bytes) -> dict[str, Any] | None:
    """The envelope as kombu's ``Message`` reads it, or None when it would raise there."""
    try:
        payload = orjson.loads(text)
    except orjson.JSONDecodeError:
        try:  # e.g. a lone surrogate escape, which orjson refuses and JSON allows
            payload = loads(text)
        except ValueError:
            return None
    if not isinstance(payload, dict):
        return None
    props = payload.get("properties")
    headers = payload.get("headers")
    body = payload.get("body")
    if not isinstance(props, dict) or not isinstance(props.get("delivery_tag"), str):
        return None
    if headers is not None and not isinstance(headers, dict):
        return None
    if body is not None and not isinstance(body, str):
        return None
    for field in ("content-type", "content-encoding"):
        if payload.get(field) is not None and not isinstance(payload[field], str):
            return None
    if props.get("body_encoding") not in (None, "base64"):
        return None
    return payload


class Transport(kombu_redis.Transport):
    Channel = Channel

    #: The worker's event loop, for the ack timer (None when consuming without one).
    hub: Any = None

    def register_with_event_loop(self, connection: Any, loop: Any) -> None:
        self.hub = loop
        super().register_with_event_loop(connection, loop)

    def poll_now(self) -> None:
        """What a tick of the event loop does for this transport (kombu's ``on_poll_start``):
        start each channel's wait or fetch and watch its connections. A fetch window's end calls
        it, not to wait for the next tick."""
        cycle: Any = self.cycle  # kombu's MultiChannelPoller
        hub = self.hub
        if hub is None:
            return
        cycle.on_poll_start()
        for fd in cycle.fds:
            hub.add_reader(fd, self.on_readable, fd)


#: The consumer's reconnect steps, seconds (``interval_start``, ``interval_step``,
#: ``interval_max``). Celery reconnects its consumer with ``Connection.ensure_connection`` and
#: kombu's defaults, 2 s more after each round (2, 4, 6 ... 30 s), and has no setting for them.
#: After a ``kill -9`` of the master the sentinels name another within 2-3 s: a worker that has
#: just slept 2 s and then 4 s fetched again at +6.1 s, with these steps at +3.0 s. A round tries
#: every part of the URL (each sentinel), so a dead Redis costs a few connection attempts a second.
RECONNECT_STEPS = (0.1, 0.25, 1.0)


class _Connection(Connection):
    """A kombu ``Connection`` that shows its URL with the Redis scheme it stands for: Flower's
    broker pages (``/broker``, ``/api/queues/length``) pick their Redis client by that scheme;
    and that reconnects in ``RECONNECT_STEPS`` unless told other steps."""

    def as_uri(self, *args: Any, **kwargs: Any) -> str:
        return as_redis_url(super().as_uri(*args, **kwargs))

    def ensure_connection(self, *args: Any, **kwargs: Any) -> Any:
        for name, seconds in zip(
            ("interval_start", "interval_step", "interval_max"), RECONNECT_STEPS, strict=True
        ):
            kwargs.setdefault(name, seconds)
        return super().ensure_connection(*args, **kwargs)


class _AMQP(AMQP):  # type: ignore[misc]
    Connection = _Connection


#: The worker app's ``amqp`` class (``Celery(amqp=...)``).
AMQP_CLASS = f"{__name__}:_AMQP"
