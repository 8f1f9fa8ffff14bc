"""Poison messages against a real worker process: pushed raw onto the queue (as any sender could),
each ends once, with a dead letter, and the worker goes on training."""

from __future__ import annotations

import time
import uuid
from typing import Any

import orjson
import redis

from producer.client import TrainingClient
from producer.keys import ModelKeys
from producer.protocol import TASK_TRAIN_BATCH, TASK_TRAIN_STEP, encode_envelope, result_key
from tests.helpers import raw_event, wait_until

BAD_TIMESTAMP = "0001-01-01T00:00:00+01:00"
#: How long a redelivery loop gets to show itself (the old worker requeued ~140 times a second).
SETTLE = 3.0


def _meta(client: redis.Redis, task_id: str) -> dict[str, Any] | None:
    raw = client.get(result_key(task_id))
    return None if raw is None else orjson.loads(raw)


def _dead_for(client: redis.Redis, model: str, event_id: str) -> int:
    return sum(orjson.loads(e)["event_id"] == event_id for e in client.lrange(ModelKeys(model).dead, 0, -1))


def test_poison_chunk_fails_once_and_the_worker_goes_on(
    start_workers, make_model, client: TrainingClient, redis_client: redis.Redis
) -> None:
    # Given a worker, and a chunk pushed raw whose second event's date is before year 1 in UTC
    model = make_model()
    (proc,) = start_workers(1)
    queue = client.settings.queue
    good, bad = str(uuid.uuid4()), str(uuid.uuid4())
    events = [raw_event(model, "neighbour"), raw_event(model, "poison", timestamp=BAD_TIMESTAMP)]
    redis_client.lpush(
        queue, encode_envelope(TASK_TRAIN_BATCH, str(uuid.uuid4()), [[good, bad], events], queue)
    )
    # When the worker has taken it
    wait_until(lambda: _meta(redis_client, good) and _meta(redis_client, bad), 30, "both results")
    # Then the neighbour trained and the poison event failed naming the field
    assert _meta(redis_client, good)["result"]["status"] == "trained"
    failed = _meta(redis_client, bad)
    assert failed["status"] == "FAILURE"
    assert "timestamp" in failed["result"]["exc_message"][0]
    # And after a while its dead letter is still there exactly once: the message was not redelivered
    time.sleep(SETTLE)
    assert _dead_for(redis_client, model, "poison") == 1
    assert redis_client.llen(queue) == 0
    # And the worker is alive and trains the next event
    assert proc.poll() is None
    assert client.train_step(raw_event(model, "after")).get(timeout=30)["status"] == "trained"
    assert int(redis_client.hget(ModelKeys(model).ckpt, "step")) == 2


def test_surrogate_header_id_and_forged_chunk_against_a_worker(
    start_workers, make_model, client: TrainingClient, redis_client: redis.Redis
) -> None:
    # Given a worker and a job whose event trained
    model = make_model()
    (proc,) = start_workers(1)
    queue = client.settings.queue
    victim = client.train_step(raw_event(model, "real"))
    assert victim.get(timeout=30)["status"] == "trained"
    original = redis_client.get(result_key(victim.id))
    # When a train_step whose header id is the JSON escape "\ud800" is pushed raw
    envelope = encode_envelope(TASK_TRAIN_STEP, "@ID@", [raw_event(model, "orphan")], queue)
    redis_client.lpush(queue, envelope.replace(b'"@ID@"', b'"\\ud800"'))
    # And a forged chunk naming the trained job's id with a junk event
    forged = encode_envelope(
        TASK_TRAIN_BATCH, str(uuid.uuid4()), [[victim.id], [{"event_id": "junk", "model": model}]], queue
    )
    redis_client.lpush(queue, forged)
    # Then each is refused once, with a dead letter, and the worker goes on
    wait_until(lambda: _dead_for(redis_client, model, "junk") == 1, 30, "the forged chunk's dead letter")
    wait_until(lambda: _dead_for(redis_client, model, "orphan") == 1, 30, "the orphan's dead letter")
    time.sleep(SETTLE)
    assert _dead_for(redis_client, model, "orphan") == 1
    assert _dead_for(redis_client, model, "junk") == 1
    # And the trained job's result is untouched, and the orphan was not trained
    assert redis_client.get(result_key(victim.id)) == original
    assert int(redis_client.hget(ModelKeys(model).ckpt, "step")) == 1
    assert proc.poll() is None
    assert client.train_step(raw_event(model, "after")).get(timeout=30)["status"] == "trained"
