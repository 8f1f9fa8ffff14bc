"""The delivery count the transport keeps reaches the worker: a message handed out more than
``ITRAIN_MAX_DELIVERIES`` times is dead-lettered, not trained; its neighbours train.

Needs the worker's own kombu transport, which counts deliveries in Redis (``unacked_deliveries``,
delivery tag -> times handed out); without it the module is skipped.
"""

from __future__ import annotations

import uuid
from typing import Any

import orjson
import pytest
import redis

from producer.keys import ModelKeys
from producer.protocol import TASK_TRAIN_STEP, encode_envelope, new_task_id, result_key
from producer.settings import Settings
from tests.helpers import check_each_event_once, create_model, make_events, wait_until

transport = pytest.importorskip("worker.consume.transport")


def test_message_delivered_too_often_is_dead_lettered_and_its_neighbours_train(
    start_workers: Any, redis_url: str, redis_client: redis.Redis
) -> None:
    # Given a message that the broker has already handed out ITRAIN_MAX_DELIVERIES times
    queue = f"itrain-deliveries-{uuid.uuid4().hex[:8]}"
    settings = Settings(redis_url=redis_url, queue=queue)
    start_workers(1, env={"ITRAIN_QUEUE": queue, "ITRAIN_MAX_DELIVERIES": "3"})
    model = create_model(redis_client, settings)
    events = make_events(model, 4, f"dl-{uuid.uuid4().hex[:6]}")
    ids = [new_task_id() for _ in events]
    envelopes = [encode_envelope(TASK_TRAIN_STEP, i, [e], queue) for i, e in zip(ids, events, strict=True)]
    worn_tag = orjson.loads(envelopes[1])["properties"]["delivery_tag"]
    redis_client.hset(transport.Channel.deliveries_key, worn_tag, 3)

    # When it arrives with three fresh ones
    redis_client.lpush(queue, *envelopes)
    keys = [result_key(i) for i in ids]
    raw = wait_until(lambda: (r := redis_client.mget(keys)) and all(r) and r, 60, "every result")
    results = [orjson.loads(r) for r in raw]

    # Then the worn one (4th delivery > 3) is answered FAILURE with a dead letter, untrained
    assert results[1]["status"] == "FAILURE", results[1]
    assert "3" in results[1]["result"]["exc_message"][0]
    dead = [orjson.loads(d) for d in redis_client.lrange(ModelKeys(model).dead, 0, -1)]
    assert [d["task_id"] for d in dead] == [ids[1]]
    # ... and the others trained, each once
    assert [results[i]["result"]["status"] for i in (0, 2, 3)] == ["trained"] * 3
    fresh = [events[i]["event_id"] for i in (0, 2, 3)]
    assert check_each_event_once(redis_client, model, fresh)["step"] == 3
