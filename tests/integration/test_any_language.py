"""The README's "Enqueue from any language" exchange, with plain redis-py calls: no Celery and no
project code on the sending side, only LPUSH of the documented envelope and GET of the result."""

from __future__ import annotations

import base64
import json
import time
import uuid

import redis


def _envelope(task: str, task_id: str, args: list, queue: str = "itrain") -> str:
    body = base64.b64encode(json.dumps([args, {}, {}]).encode()).decode()
    return json.dumps(
        {
            "body": body,
            "content-type": "application/json",
            "content-encoding": "utf-8",
            "headers": {"task": task, "id": task_id},
            "properties": {
                "delivery_tag": task_id,
                "body_encoding": "base64",
                "delivery_info": {"exchange": "", "routing_key": queue},
            },
        }
    )


def _get_result(client: redis.Redis, task_id: str, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        raw = client.get(f"celery-task-meta-{task_id}")
        if raw is not None:
            return json.loads(raw)
        time.sleep(0.05)
    raise AssertionError(f"no result for {task_id} within {timeout} s")


def test_raw_redis_producer_trains_and_reads_result(start_workers, make_model, redis_url: str) -> None:
    # Given a model and a worker, and a producer that only speaks Redis
    model = make_model()
    start_workers(1)
    client = redis.Redis.from_url(redis_url)
    task_id = str(uuid.uuid4())
    event = {
        "event_id": "evt-0001",
        "user_id": "user-42",
        "action_type": "click",
        "timestamp": "2026-11-27T10:15:00Z",
        "model": model,
    }
    # When it pushes the documented envelope and polls the documented key
    client.lpush("itrain", _envelope("itrain.train_step", task_id, [event]))
    meta = _get_result(client, task_id)
    # Then the result is the contract's trained result
    assert meta["status"] == "SUCCESS"
    assert meta["result"]["status"] == "trained"
    assert meta["result"]["event_id"] == "evt-0001"
    assert meta["result"]["model"] == model
    assert meta["result"]["step"] == 1


def test_raw_redis_batch_and_failure(start_workers, make_model, redis_url: str) -> None:
    # Given a model and a worker
    model = make_model()
    start_workers(1)
    client = redis.Redis.from_url(redis_url)
    ids = [str(uuid.uuid4()) for _ in range(3)]
    events = [
        {"user_id": f"u{i}", "action_type": "view", "timestamp": 1764238500 + i, "model": model}
        for i in range(3)
    ]
    bad_id = str(uuid.uuid4())
    # When a raw batch and a raw event with a missing field are pushed
    client.lpush("itrain", _envelope("itrain.train_batch", str(uuid.uuid4()), [ids, events]))
    client.lpush(
        "itrain",
        _envelope("itrain.train_step", bad_id, [{"action_type": "view", "timestamp": 0, "model": model}]),
    )
    # Then every event of the batch has its own result, in order
    steps = [_get_result(client, i)["result"]["step"] for i in ids]
    assert steps == [1, 2, 3]
    # And the bad one is a FAILURE naming the missing field
    failure = _get_result(client, bad_id)
    assert failure["status"] == "FAILURE"
    assert failure["result"]["exc_type"] == "InvalidEventError"
    assert "user_id" in failure["result"]["exc_message"][0]
