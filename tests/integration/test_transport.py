"""Our kombu transport (``worker.consume.transport``) against a real redis-server, in process.

Each test drives kombu's public consumer API (``Connection``, ``Consumer``, ``drain_events``) on
the ``itrain://`` scheme and reads the result from Redis itself: what is on the queue, what is
recorded as unacknowledged, and how many commands Redis ran (``INFO commandstats``).
"""

from __future__ import annotations

import base64
import contextlib
import logging
import threading
import time
import uuid
import zlib
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import redis
from kombu import Connection, Consumer, Exchange, Queue  # type: ignore[attr-defined]
from kombu.asynchronous import Hub

from producer.keys import TRANSPORT_REJECTED
from producer.protocol import TASK_TRAIN_STEP, encode_envelope, new_task_id
from worker.consume.transport import Channel, Transport, as_redis_url, transport_url
from worker.devtools.embedded_redis import RedisServer

# Kombu's unacked layout, and our delivery counts.
UNACKED, INDEX, DELIVERIES, FIRST = "unacked", "unacked_index", "unacked_deliveries", "unacked_first_taken"


@pytest.fixture
def queue(redis_client: redis.Redis) -> Iterator[str]:
    name = f"tq-{uuid.uuid4().hex[:8]}"
    yield name
    redis_client.delete(name, UNACKED, INDEX, DELIVERIES, FIRST, TRANSPORT_REJECTED)


def _envelope(queue: str, n: int = 0) -> bytes:
    event = {"event_id": f"e{n}", "user_id": "u", "action_type": "click", "timestamp": 0, "model": "m"}
    return encode_envelope(TASK_TRAIN_STEP, new_task_id(), [event], queue)


def _calls(client: redis.Redis, command: str) -> int:
    stats = client.info("commandstats").get(f"cmdstat_{command}")
    return int(stats["calls"]) if stats else 0


class _Collect:
    def __init__(self) -> None:
        self.messages: list[Any] = []

    def __call__(self, body: Any, message: Any) -> None:
        self.messages.append(message)


def _consume(url: str, queue: str, **options: Any) -> tuple[Connection, Consumer, _Collect]:
    conn = Connection(transport_url(url), transport_options=options)
    got = _Collect()
    consumer = Consumer(conn.channel(), [Queue(queue, routing_key=queue)], callbacks=[got], accept=["json"])
    consumer.consume()
    return conn, consumer, got


def _drain(conn: Connection, got: _Collect, want: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while len(got.messages) < want and time.monotonic() < deadline:
        with contextlib.suppress(TimeoutError):
            conn.drain_events(timeout=0.5)


def test_the_scheme_selects_our_transport_and_shows_a_redis_url(redis_url: str) -> None:
    with Connection(transport_url(redis_url)) as conn:
        assert isinstance(conn.transport, Transport)
        assert isinstance(conn.default_channel, Channel)
    assert transport_url("rediss://:pw@h:6380/1") == "itrains://:pw@h:6380/1"
    assert as_redis_url("itrains://:pw@h:6380/1") == "rediss://:pw@h:6380/1"


def test_n_messages_fetched_and_recorded_in_one_call(
    redis_url: str, redis_client: redis.Redis, queue: str
) -> None:
    # Given 10 messages waiting
    redis_client.lpush(queue, *[_envelope(queue, i) for i in range(10)])
    conn, _, got = _consume(redis_url, queue)
    try:
        before = _calls(redis_client, "evalsha")
        # When the consumer drains once
        conn.drain_events(timeout=2)
        # Then all ten came in one script call, each recorded as unacknowledged, in queue order
        assert _calls(redis_client, "evalsha") - before == 1
        assert len(got.messages) == 10
        assert [orjson.loads(m.body)[0][0]["event_id"] for m in got.messages] == [f"e{i}" for i in range(10)]
        assert redis_client.llen(queue) == 0
        assert redis_client.hlen(UNACKED) == 10
        assert redis_client.zcard(INDEX) == 10
        tags = {m.delivery_tag for m in got.messages}
        assert {t.decode() for t in redis_client.hkeys(UNACKED)} == tags
        # The record is kombu's format, built from the original text.
        record = orjson.loads(redis_client.hget(UNACKED, got.messages[0].delivery_tag))
        assert record[1:] == ["", queue]
        assert record[0]["properties"]["delivery_tag"] == got.messages[0].delivery_tag
        assert all(m.delivery_info["deliveries"] == 1 for m in got.messages)
    finally:
        conn.release()


def test_fetch_size_is_bounded_by_fetch_max_and_prefetch(
    redis_url: str, redis_client: redis.Redis, queue: str
) -> None:
    redis_client.lpush(queue, *[_envelope(queue, i) for i in range(30)])
    conn, consumer, got = _consume(redis_url, queue, fetch_max=8)
    try:
        conn.drain_events(timeout=2)
        assert len(got.messages) == 8
        assert redis_client.llen(queue) == 22
        consumer.qos(prefetch_count=12)
        _drain(conn, got, 12, timeout=2)
        # 12 unacknowledged: no more may come until a quarter of the window is free again.
        assert len(got.messages) == 12
        with pytest.raises(TimeoutError):
            conn.drain_events(timeout=0.5)
        for m in got.messages[:3]:
            m.ack()
        _drain(conn, got, 15, timeout=2)
        assert len(got.messages) == 15
    finally:
        conn.release()


def test_a_fetch_takes_at_most_fetch_bytes_of_a_queue_and_counts_as_full(
    redis_url: str, redis_client: redis.Redis, queue: str
) -> None:
    # Given 10 large messages waiting (as train_many's chunks are), and a bound of 2.5 of them
    def large(i: int) -> bytes:
        event = {"event_id": f"e{i}", "model": "m", "pad": "x" * 20_000}
        return encode_envelope(TASK_TRAIN_STEP, new_task_id(), [event], queue)

    items = [large(i) for i in range(10)]
    redis_client.lpush(queue, *items)
    conn, _, got = _consume(redis_url, queue, fetch_bytes=len(items[0]) * 5 // 2)
    try:
        # When the consumer drains once
        conn.drain_events(timeout=2)
        # Then one fetch took the three that reach the bound (the third crosses it), in order
        assert [orjson.loads(m.body)[0][0]["event_id"] for m in got.messages] == ["e0", "e1", "e2"]
        assert redis_client.llen(queue) == 7
        # And the fetch counted as full: the next one is sent at once, with no wait (BLMOVE)
        waits = _calls(redis_client, "blmove")
        conn.drain_events(timeout=2)
        assert len(got.messages) == 6
        assert _calls(redis_client, "blmove") == waits
    finally:
        conn.release()
    # A bound smaller than one message still takes one message a fetch
    conn, _, got = _consume(redis_url, queue, fetch_bytes=1)
    try:
        conn.drain_events(timeout=2)
        assert len(got.messages) == 1
    finally:
        conn.release()


def test_acks_are_batched_into_one_round_trip(redis_url: str, redis_client: redis.Redis, queue: str) -> None:
    redis_client.lpush(queue, *[_envelope(queue, i) for i in range(20)])
    conn, consumer, got = _consume(redis_url, queue)
    try:
        conn.drain_events(timeout=2)
        assert len(got.messages) == 20
        # As in a worker: an event loop is registered, so acks wait for the timer.
        conn.transport.hub = Hub()
        before = _calls(redis_client, "evalsha") + _calls(redis_client, "eval")
        for m in got.messages:
            m.ack()
        assert redis_client.hlen(UNACKED) == 20, "acks were written one by one"
        assert consumer.channel.qos.can_consume()
        consumer.channel.qos.flush_acks()
        # One script for the 20 (lua/ack.lua; EVAL once when Redis had not loaded it yet).
        assert _calls(redis_client, "evalsha") + _calls(redis_client, "eval") - before in (1, 2)
        assert redis_client.hlen(UNACKED) == 0
        assert redis_client.zcard(INDEX) == 0
        assert redis_client.hlen(DELIVERIES) == 0
    finally:
        conn.transport.hub = None
        conn.release()


def test_an_idle_consumer_blocks_and_a_lone_message_wakes_it(
    redis_url: str, redis_client: redis.Redis, queue: str
) -> None:
    conn, _, got = _consume(redis_url, queue)
    try:
        with pytest.raises(TimeoutError):
            conn.drain_events(timeout=0.3)  # the first fetch finds nothing, then it waits
        before = _calls(redis_client, "evalsha")
        with pytest.raises(TimeoutError):
            conn.drain_events(timeout=1.5)
        # Waiting is one BLMOVE per brpop_timeout (1 s) and a fetch after it: no busy polling.
        assert _calls(redis_client, "evalsha") - before <= 3
        redis_client.lpush(queue, _envelope(queue))
        _drain(conn, got, 1, timeout=3)
        assert len(got.messages) == 1
        assert redis_client.llen(queue) == 0
    finally:
        conn.release()


def test_unacked_message_restored_after_the_visibility_timeout(
    redis_url: str, redis_client: redis.Redis, queue: str
) -> None:
    redis_client.lpush(queue, _envelope(queue))
    conn, consumer, got = _consume(redis_url, queue, visibility_timeout=1)
    conn.drain_events(timeout=2)
    (first,) = got.messages
    # The worker dies: nothing is acked and nothing given back.
    consumer.channel.qos._delivered.clear()
    conn.release()
    assert redis_client.hlen(UNACKED) == 1
    assert redis_client.llen(queue) == 0

    # kombu's restore is guarded by a lock key that a Redis crash can leave behind for 5 minutes;
    # ours is one script and needs none.
    redis_client.set("unacked_mutex", "left by a crash", ex=300)
    conn2, consumer2, got2 = _consume(redis_url, queue, visibility_timeout=1)
    try:
        time.sleep(1.2)
        consumer2.channel.qos.restore_visible(num=10, interval=1)
        assert redis_client.llen(queue) == 1
        _drain(conn2, got2, 1)
        (again,) = got2.messages
        assert again.delivery_tag == first.delivery_tag
        assert again.delivery_info["deliveries"] == 2
        assert again.headers.get("redelivered") is True
    finally:
        conn2.release()
        redis_client.delete("unacked_mutex")


def test_non_envelope_items_are_dropped_with_a_log_line(
    redis_url: str, redis_client: redis.Redis, queue: str, caplog: pytest.LogCaptureFixture
) -> None:
    # Given junk between two valid messages (LPUSH: the last pushed is consumed last)
    big = orjson.dumps({"properties": {"delivery_tag": "x"}, "pad": "a" * 200_000})
    not_base64 = orjson.loads(_envelope(queue))
    not_base64["body"] = "%%% not base64 %%%"
    junk = [b"not json", b'{"properties": {}}', b"[1, 2]", big, b'{"properties": {"delivery_tag": 7}}']
    unreadable = [orjson.dumps(not_base64)]  # an envelope by its shape, which kombu cannot read
    redis_client.lpush(queue, _envelope(queue, 0), *junk, *unreadable, _envelope(queue, 1))
    caplog.set_level(logging.ERROR, logger="itrain.transport")
    conn, _, got = _consume(redis_url, queue, max_envelope_bytes=100_000)
    try:
        _drain(conn, got, 2)
        # Then both valid messages arrive, the junk is gone, logged and recorded (no content)
        assert [orjson.loads(m.body)[0][0]["event_id"] for m in got.messages] == ["e0", "e1"]
        assert redis_client.llen(queue) == 0
        assert redis_client.hlen(UNACKED) == 2
        drops = [r for r in caplog.records if "not a message envelope" in r.getMessage()]
        assert len(drops) == len(junk) + len(unreadable)
        rejected = [orjson.loads(r) for r in redis_client.lrange(TRANSPORT_REJECTED, 0, -1)]
        assert len(rejected) == len(junk)
        assert any("larger than the limit of 100000" in r["reason"] for r in rejected)
        assert all(set(r) == {"reason", "bytes", "at"} for r in rejected)
    finally:
        conn.release()


def test_compressed_bodies_reach_the_consumer_still_compressed(
    redis_url: str, redis_client: redis.Redis, queue: str
) -> None:
    raw = orjson.loads(_envelope(queue))
    raw["headers"]["compression"] = "application/x-gzip"
    raw["body"] = base64.b64encode(zlib.compress(b"0" * 1_000_000)).decode()
    redis_client.lpush(queue, orjson.dumps(raw))
    got: list[Any] = []
    with Connection(transport_url(redis_url)) as conn:
        channel = conn.channel()
        consumer = Consumer(channel, [Queue(queue, routing_key=queue)], on_message=got.append)
        consumer.consume()
        conn.drain_events(timeout=2)
    (message,) = got
    assert message.headers["compression"] == "application/x-gzip"
    assert len(message.body) < 10_000, "the body was inflated"


def test_close_gives_a_pending_fetch_back_in_order(
    redis_url: str, redis_client: redis.Redis, queue: str
) -> None:
    redis_client.lpush(queue, *[_envelope(queue, i) for i in range(5)])
    conn = Connection(transport_url(redis_url))
    channel = conn.channel()
    channel.basic_consume(queue, False, lambda m: None, "t")
    # A fetch is sent (the poller's start of a loop tick), and the channel closes before its
    # reply is read.
    conn.transport.cycle.on_poll_start()
    assert channel._pending[0] == "FETCH"
    channel.close()
    conn.release()
    assert redis_client.hlen(UNACKED) == 0
    items = redis_client.lrange(queue, 0, -1)
    # Consumed from the right: e0 is first in line again.
    ids = [orjson.loads(base64.b64decode(orjson.loads(i)["body"]))[0][0]["event_id"] for i in items]
    assert ids[::-1] == [f"e{i}" for i in range(5)]


def test_reject_with_requeue_gives_back_without_counting_a_delivery(
    redis_url: str, redis_client: redis.Redis, queue: str
) -> None:
    # Given a message taken once
    redis_client.lpush(queue, _envelope(queue))
    conn, _, got = _consume(redis_url, queue)
    try:
        _drain(conn, got, 1)
        taken = got.messages[0].delivery_info["first_taken"]
        assert abs(taken - time.time()) < 60
        # When its job meets a Redis fault and gives it back five times over
        for round_ in range(2, 7):
            got.messages[-1].reject(requeue=True)
            _drain(conn, got, round_)
            # Then every delivery is still its first, and its age runs from the first take
            assert got.messages[-1].delivery_info["deliveries"] == 1
            assert got.messages[-1].delivery_info["first_taken"] == taken
        got.messages[-1].ack()
        _drain(conn, got, 7, timeout=0.5)
        assert len(got.messages) == 6
        # ... and the ack forgets it everywhere
        assert [redis_client.hlen(k) for k in (UNACKED, DELIVERIES, FIRST)] == [0, 0, 0]
        assert redis_client.zcard(INDEX) == 0
        assert redis_client.llen(queue) == 0
    finally:
        conn.release()


def test_warm_shutdown_gives_back_in_order_without_counting(
    redis_url: str, redis_client: redis.Redis, queue: str
) -> None:
    # Given three messages taken by a consumer that then stops (a warm shutdown, or its channel
    # closed after a lost connection) without acking them
    redis_client.lpush(queue, *[_envelope(queue, i) for i in range(3)])
    conn, _, got = _consume(redis_url, queue)
    _drain(conn, got, 3)
    conn.release()
    # Then they are back on the queue, first in line in their order, and none counted
    assert redis_client.hlen(UNACKED) == 0
    assert redis_client.llen(queue) == 3
    conn2, _, got2 = _consume(redis_url, queue)
    try:
        _drain(conn2, got2, 3)
        assert [orjson.loads(m.body)[0][0]["event_id"] for m in got2.messages] == ["e0", "e1", "e2"]
        assert [m.delivery_info["deliveries"] for m in got2.messages] == [1, 1, 1]
        assert all(m.headers.get("redelivered") is True for m in got2.messages)
    finally:
        conn2.release()


def test_a_give_back_of_a_message_already_swept_pushes_nothing(
    redis_url: str, redis_client: redis.Redis, queue: str
) -> None:
    # Given a message held past the visibility timeout, swept back and taken by another consumer
    redis_client.lpush(queue, _envelope(queue))
    conn, consumer, got = _consume(redis_url, queue, visibility_timeout=1)
    _drain(conn, got, 1)
    time.sleep(1.2)
    consumer.channel.qos.restore_visible(num=10, interval=1)
    conn2, _, got2 = _consume(redis_url, queue)
    try:
        _drain(conn2, got2, 1)
        assert got2.messages[0].delivery_info["deliveries"] == 2  # the sweep counted
        # When the first holder gives it back late
        got.messages[0].reject(requeue=True)
        # Then nothing is pushed (no second copy) and the new holder's count stands
        assert redis_client.llen(queue) == 0
        assert int(redis_client.hget(DELIVERIES, got2.messages[0].delivery_tag)) == 2
    finally:
        conn2.release()
        conn.release()


def test_a_fetch_whose_reply_was_lost_goes_back_without_counting(
    redis_url: str, redis_client: redis.Redis, queue: str
) -> None:
    # Given a fetch that Redis ran (three messages recorded as unacknowledged) ...
    redis_client.lpush(queue, *[_envelope(queue, i) for i in range(3)])
    conn = Connection(transport_url(redis_url))
    channel = conn.channel()
    channel.basic_consume(queue, False, lambda m: None, "t")
    conn.transport.cycle.on_poll_start()
    assert channel._pending[0] == "FETCH"
    wait = time.monotonic() + 5
    while redis_client.hlen(UNACKED) < 3 and time.monotonic() < wait:
        time.sleep(0.01)
    assert redis_client.hlen(UNACKED) == 3
    # ... whose reply is lost with its connection before it is read
    channel.client.connection.disconnect()
    assert channel._pending is None
    conn.release()
    assert redis_client.hlen(UNACKED) == 3
    # When the worker connects again
    conn2, _, got = _consume(redis_url, queue)
    try:
        _drain(conn2, got, 3)
        # Then the three come back at once (their order is lost with the reply), each still on
        # its first counted delivery
        assert sorted(orjson.loads(m.body)[0][0]["event_id"] for m in got.messages) == ["e0", "e1", "e2"]
        assert [m.delivery_info["deliveries"] for m in got.messages] == [1, 1, 1]
    finally:
        conn2.release()


def test_held_messages_whose_give_back_failed_go_back_once_redis_answers(tmp_path: Any) -> None:
    # Given a consumer holding two messages on a Redis of its own (every write kept on disk)
    server = RedisServer(data_dir=tmp_path, appendonly=True, appendfsync="always").start()
    try:
        client = redis.Redis.from_url(server.url)
        queue = f"tq-{uuid.uuid4().hex[:8]}"
        client.lpush(queue, _envelope(queue, 0), _envelope(queue, 1))
        conn, _, got = _consume(server.url, queue)
        _drain(conn, got, 2)
        # When Redis dies under it, so that the give-back at close fails ...
        server.kill()
        conn.release()
        # ... and comes back (the messages recorded as unacknowledged, not on the queue)
        server = RedisServer(server.port, data_dir=tmp_path, appendonly=True, appendfsync="always").start()
        client = redis.Redis.from_url(server.url)
        assert (client.hlen(UNACKED), client.llen(queue)) == (2, 0)
        # Then the next consumer gives them back at once, not after the visibility timeout, and
        # their delivery count is still the first
        conn2, _, got2 = _consume(server.url, queue)
        try:
            _drain(conn2, got2, 2)
            assert sorted(orjson.loads(m.body)[0][0]["event_id"] for m in got2.messages) == ["e0", "e1"]
            assert [m.delivery_info["deliveries"] for m in got2.messages] == [1, 1]
        finally:
            conn2.release()
    finally:
        server.close()


def test_a_broadcast_consumer_subscribes_again_when_its_connection_is_reopened(
    redis_url: str, redis_client: redis.Redis
) -> None:
    # Given a consumer of a fanout exchange (as Celery's pidbox broadcast) on the worker's event
    # loop, with the worker's one retry of a failed read (retry_on_timeout), subscribed
    name = f"tb-{uuid.uuid4().hex[:8]}"
    exchange = Exchange(name, type="fanout")
    options = {"retry_on_timeout": True, "socket_timeout": 5}
    conn = Connection(transport_url(redis_url), transport_options=options)
    got = _Collect()
    queues = [Queue(name, exchange, exclusive=True)]
    Consumer(conn.channel(), queues, callbacks=[got], accept=["json"]).consume()
    hub = Hub()
    conn.transport.register_with_event_loop(conn.connection, hub)
    loop = hub.create_loop()
    try:
        _spin(loop, 1.0)
        assert _pubsub_patterns(redis_client) == [1]
        # When Redis closes the pub/sub connection, so that the read fails and redis-py's retry
        # opens another one under the reader (after a failover: to the new master)
        redis_client.client_kill_filter(_type="pubsub")
        reader = threading.Thread(target=_spin, args=(loop, 2.0), daemon=True)
        reader.start()
        reader.join(20)
        # Then the loop does not wait for good on a connection subscribed to nothing: the new
        # connection subscribed again, and a broadcast reaches the consumer
        assert not reader.is_alive(), "the event loop hangs reading an unsubscribed connection"
        assert _pubsub_patterns(redis_client) == [1]
        with Connection(transport_url(redis_url)) as publisher:
            publisher.Producer().publish({"n": 1}, exchange=exchange, declare=[exchange], serializer="json")
        _spin(loop, 2.0, until=lambda: bool(got.messages))
        assert [m.payload for m in got.messages] == [{"n": 1}]
    finally:
        hub.close()
        conn.release()


def _pubsub_patterns(client: redis.Redis) -> list[int]:
    return [int(c["psub"]) for c in client.client_list(_type="pubsub")]


def _spin(loop: Iterator[Any], seconds: float, until: Any = None) -> None:
    """Run the event loop for ``seconds`` (or until ``until()``)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline and not (until and until()):
        next(loop)
