"""A late ack never removes another delivery's record (``worker/consume/lua/ack.lua``).

kombu names a message by its delivery tag, and the tag survives redelivery: a message swept back
after the visibility timeout and taken by a second consumer is recorded under the same tag. A
first consumer that was cut off from Redis meanwhile acks (or rejects) it late under that tag.
Each test drives two real consumers of our transport on the session's redis-server, and reads
the records from Redis itself.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import redis
from kombu import Connection, Consumer, Queue  # type: ignore[attr-defined]

from producer.protocol import TASK_TRAIN_STEP, encode_envelope, new_task_id
from worker.consume.transport import transport_url

UNACKED, INDEX, DELIVERIES, FIRST = "unacked", "unacked_index", "unacked_deliveries", "unacked_first_taken"


@pytest.fixture
def queue(redis_client: redis.Redis) -> Iterator[str]:
    name = f"tla-{uuid.uuid4().hex[:8]}"
    yield name
    redis_client.delete(name, UNACKED, INDEX, DELIVERIES, FIRST)


class _Consumer:
    """One kombu consumer of ``queue`` on the ``itrain://`` transport, collecting what it gets."""

    def __init__(self, url: str, queue: str) -> None:
        self.conn = Connection(transport_url(url), transport_options={"visibility_timeout": 1})
        self.messages: list[Any] = []
        self.consumer = Consumer(
            self.conn.channel(),
            [Queue(queue, routing_key=queue)],
            callbacks=[lambda body, message: self.messages.append(message)],
            accept=["json"],
        )
        self.consumer.consume()

    @property
    def qos(self) -> Any:
        return self.consumer.channel.qos

    def take(self, want: int = 1, timeout: float = 10.0) -> Any:
        deadline = time.monotonic() + timeout
        while len(self.messages) < want and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                self.conn.drain_events(timeout=0.5)
        assert len(self.messages) >= want, f"took {len(self.messages)} message(s), wanted {want}"
        return self.messages[want - 1]

    def die(self) -> None:
        """Go away without a verdict (a killed worker): nothing acked, nothing given back."""
        self.qos._delivered.clear()
        self.conn.release()


def _taken_by_two(redis_url: str, redis_client: redis.Redis, queue: str) -> tuple[_Consumer, _Consumer, str]:
    """A message taken by a first consumer, held past the visibility timeout (1 s), swept back and
    taken again by a second consumer; the two consumers and its delivery tag."""
    event = {"event_id": "e0", "user_id": "u", "action_type": "click", "timestamp": 0, "model": "m"}
    redis_client.lpush(queue, encode_envelope(TASK_TRAIN_STEP, new_task_id(), [event], queue))
    first = _Consumer(redis_url, queue)
    tag = first.take().delivery_tag
    time.sleep(1.2)
    first.qos.restore_visible(num=10, interval=1)
    assert redis_client.llen(queue) == 1, "the sweep did not give the message back"
    second = _Consumer(redis_url, queue)
    again = second.take()
    assert again.delivery_tag == tag, "kombu's delivery tag changed on redelivery"
    assert again.delivery_info["deliveries"] == 2
    return first, second, tag


def _record(client: redis.Redis, tag: str) -> tuple[float | None, bool, int]:
    """The message's record: its score, whether its text is kept, its delivery count."""
    count = int(client.hget(DELIVERIES, tag) or 0)
    return client.zscore(INDEX, tag), bool(client.hexists(UNACKED, tag)), count


def test_a_late_ack_leaves_the_new_holders_record(
    redis_url: str, redis_client: redis.Redis, queue: str
) -> None:
    # Given a message redelivered to a second consumer while the first one still held it
    first, second, tag = _taken_by_two(redis_url, redis_client, queue)
    try:
        held = _record(redis_client, tag)
        assert held[0] == second.qos.taken_at[tag]
        # When the first consumer acks it late (its link came back)
        first.messages[0].ack()
        first.qos.flush_acks()
        # Then the second consumer's record stands: same take, text kept, count of two
        assert _record(redis_client, tag) == held
        # ... so when the second consumer dies holding it, the message still comes back
        second.die()
        time.sleep(1.2)
        first.qos.restore_visible(num=10, interval=1)
        assert redis_client.llen(queue) == 1, "a late ack lost the message of the worker that held it"
        # ... and its own ack, once it is the holder again, forgets it everywhere
        third = first.take(2)
        assert third.delivery_tag == tag
        assert third.delivery_info["deliveries"] == 3
        third.ack()
        first.qos.flush_acks()
        assert _record(redis_client, tag) == (None, False, 0)
        assert not redis_client.hexists(FIRST, tag)  # (the server is shared with other tests)
    finally:
        first.conn.release()
        second.conn.release()


def test_a_late_reject_leaves_the_new_holders_record(
    redis_url: str, redis_client: redis.Redis, queue: str
) -> None:
    # Given a message redelivered to a second consumer while the first one still held it
    first, second, tag = _taken_by_two(redis_url, redis_client, queue)
    try:
        held = _record(redis_client, tag)
        # When the first consumer rejects it late, without requeue (as a dead-lettered message)
        first.messages[0].reject(requeue=False)
        # Then the second consumer's record stands
        assert _record(redis_client, tag) == held
        # ... and the second consumer's own ack forgets it
        second.messages[0].ack()
        second.qos.flush_acks()
        assert _record(redis_client, tag) == (None, False, 0)
    finally:
        first.conn.release()
        second.conn.release()


def test_an_ack_of_a_message_swept_back_and_not_yet_taken_keeps_it(
    redis_url: str, redis_client: redis.Redis, queue: str
) -> None:
    # Given a message held past the visibility timeout and swept back to the queue
    event = {"event_id": "e1", "user_id": "u", "action_type": "click", "timestamp": 0, "model": "m"}
    redis_client.lpush(queue, encode_envelope(TASK_TRAIN_STEP, new_task_id(), [event], queue))
    first = _Consumer(redis_url, queue)
    try:
        message = first.take()
        time.sleep(1.2)
        first.qos.restore_visible(num=10, interval=1)
        # When its holder acks it late
        message.ack()
        first.qos.flush_acks()
        # Then it is still on the queue with its count: the next delivery is its second
        assert redis_client.llen(queue) == 1
        assert int(redis_client.hget(DELIVERIES, message.delivery_tag)) == 1
        again = first.take(2)
        assert again.delivery_info["deliveries"] == 2
        again.ack()
        first.qos.flush_acks()
        assert _record(redis_client, message.delivery_tag) == (None, False, 0)
    finally:
        first.conn.release()
