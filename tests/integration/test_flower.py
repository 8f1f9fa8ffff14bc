"""Flower, started here with basic auth, in front of a real worker: it lists every training task
with its name and final state, and the arguments it shows are the worker's (event id, action,
model; ``[N events]`` for a batch; a placeholder for ``predict``), never the ones a message's
header carries, so a raw user id put in ``argsrepr`` by ``send_task`` or a raw ``LPUSH`` never
reaches Flower through the worker. (A sender that publishes its own ``task-sent`` events chooses
what they say; the README's "What Flower shows" tells when Flower keeps them.)
"""

from __future__ import annotations

import json
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import redis

from producer.celery_config import make_celery
from producer.client import TrainingClient
from producer.protocol import TASK_PREDICT, TASK_TRAIN_BATCH, TASK_TRAIN_STEP, encode_envelope, new_task_id
from producer.settings import Settings
from tests.helpers import create_model, http_get, make_event, wait_until
from worker.consume.task_events import HIDDEN_ARGS
from worker.devtools.embedded_redis import free_port
from worker.devtools.stack import flower_command, start_process, stop_process

USER, PASSWORD = "itrain", "flower-test-pw"
WAIT = 60.0


@dataclass
class Flower:
    url: str
    proc: subprocess.Popen[bytes]
    log: Path


def _get(url: str, *, auth: bool = True) -> tuple[int, Any]:
    status, body = http_get(url, (USER, PASSWORD) if auth else None)
    return status, json.loads(body) if status == 200 else None


def _tasks(flower: Flower) -> dict[str, Any]:
    status, tasks = _get(f"{flower.url}/api/tasks")
    assert status == 200, status
    return dict(tasks)


@pytest.fixture
def flower(redis_url: str, tmp_path: Path) -> Iterator[Flower]:
    """Flower with basic auth on the session's Redis, answering its API."""
    port = free_port()
    log = tmp_path / "flower.log"
    proc = start_process(
        [*flower_command(port), f"--basic-auth={USER}:{PASSWORD}"], {"ITRAIN_REDIS_URL": redis_url}, log
    )
    try:
        url = f"http://127.0.0.1:{port}"

        def answers() -> bool:
            assert proc.poll() is None, log.read_text()
            try:
                return _get(f"{url}/api/tasks")[0] == 200
            except OSError:
                return False

        wait_until(answers, WAIT, "Flower to answer")
        yield Flower(url, proc, log)
    finally:
        stop_process(proc)


def _event(model: str, tag: str) -> dict[str, Any]:
    return {
        "event_id": f"flower-{tag}-{uuid.uuid4().hex[:8]}",
        "user_id": f"secret-user-{uuid.uuid4().hex}",
        "action_type": "click",
        "timestamp": time.time(),
        "context": {"page": 3},
        "model": model,
    }


def test_flower_api_refuses_requests_without_auth(flower: Flower) -> None:
    # Given Flower started with --basic-auth
    # Then its task list answers 401 without credentials, 200 with them
    assert _get(f"{flower.url}/api/tasks", auth=False)[0] == 401
    assert _get(f"{flower.url}/api/tasks")[0] == 200


def test_flower_shows_worker_built_args_on_every_path(
    flower: Flower, start_workers: Any, redis_url: str, redis_client: redis.Redis
) -> None:
    # Given a worker, a model, and events whose user ids are secrets
    queue = f"itrain-flower-{uuid.uuid4().hex[:8]}"
    start_workers(1, env={"ITRAIN_QUEUE": queue})
    settings = Settings(redis_url=redis_url, queue=queue)
    model = create_model(redis_client, settings)
    # A Celery sender that sets the header's argsrepr, kwargsrepr and shadow, as send_task lets
    # anyone do, and publishes no task-sent event: the worker's events are then all Flower knows
    # of its tasks. (With task-sent events on, Celery's event state keeps a sender's task-sent
    # args over the worker's when that event arrives last: the sender's choice, not the worker's.)
    hostile = make_celery(settings, main="itrain-flower-test-sender", producer=True)
    hostile.conf.task_send_sent_event = False
    with TrainingClient(settings=settings) as client, hostile:
        # Flower receives events only once it has subscribed: wait until it shows one task.
        warm = client.train_step(_event(model, "warm"))
        wait_until(
            lambda: _tasks(flower).get(warm.id, {}).get("state") == "SUCCESS", WAIT, "Flower to see a task"
        )

        # When events arrive by every path, some with the raw user id in the header's argsrepr
        step = _event(model, "step")
        sent = _event(model, "sent")
        pushed = _event(model, "lpush")
        many = [_event(model, f"many{i}") for i in range(3)]
        asked = _event(model, "predict")
        events = [step, sent, pushed, *many, asked]

        h_step = client.train_step(step)
        h_sent = hostile.send_task(
            TASK_TRAIN_STEP,
            args=[sent],
            queue=queue,
            argsrepr=f"[{sent!r}]",
            kwargsrepr=sent["user_id"],
            shadow=sent["user_id"],
        )
        pushed_id = new_task_id()
        redis_client.lpush(
            queue,
            encode_envelope(
                TASK_TRAIN_STEP, pushed_id, [pushed], queue, argsrepr=f"user={pushed['user_id']}"
            ),
        )
        h_many = client.train_many(many)
        h_predict = hostile.send_task(
            TASK_PREDICT, args=[asked], queue=queue, argsrepr=f"[{asked!r}]", shadow=asked["user_id"]
        )
        results = client.wait_all([h_step, h_sent, *h_many, h_predict], timeout=WAIT)
        assert [r["status"] for r in results[:5]] == ["trained"] * 5, results
        assert "prediction" in results[5]

        # Then Flower lists each task as SUCCESS under its own name ...
        singles = {h_step.id: step, h_sent.id: sent, pushed_id: pushed}

        def all_done() -> dict[str, Any] | None:
            tasks = _tasks(flower)
            ids = [*singles, h_predict.id]
            batches = [t for t in tasks.values() if t["name"] == TASK_TRAIN_BATCH and t["state"] == "SUCCESS"]
            done = all(tasks.get(i, {}).get("state") == "SUCCESS" for i in ids)
            return tasks if done and batches else None

        tasks = wait_until(all_done, WAIT, "Flower to show every task as SUCCESS")
        for task_id, event in singles.items():
            task = tasks[task_id]
            assert task["name"] == TASK_TRAIN_STEP
            # ... with the args the worker built from the validated event
            assert task["args"] == (
                f"[{{event_id: {event['event_id']}, action_type: click, model: {model}}}]"
            ), task
        (batch,) = [t for t in tasks.values() if t["name"] == TASK_TRAIN_BATCH]
        assert batch["args"] == "[3 events]"
        assert "'trained': 3" in batch["result"]
        assert tasks[h_predict.id]["name"] == TASK_PREDICT
        assert tasks[h_predict.id]["args"] == HIDDEN_ARGS
        # ... all of it from the worker's events: the client pushes its messages itself and the
        # Celery sender has task-sent events off, so no task here had a task-sent event
        assert [i for i, t in tasks.items() if t["sent"] is not None] == []

    # ... and no user id anywhere in what Flower serves
    text = json.dumps(tasks)
    leaked = [e["user_id"] for e in events if e["user_id"] in text]
    assert not leaked, f"Flower shows raw user ids: {leaked}"


def test_flower_broker_pages_read_the_queue(flower: Flower, redis_client: redis.Redis) -> None:
    """The worker app names its broker ``itrain://``; Flower's broker pages choose their Redis
    client by the URL's scheme, so the app shows them the ``redis://`` URL it stands for."""
    queue = Settings().queue
    # Given three messages waiting on the queue, and no worker
    event = make_event("default", 0, "flower-broker")
    envelopes = [encode_envelope(TASK_TRAIN_STEP, new_task_id(), [event], queue) for _ in range(3)]
    redis_client.lpush(queue, *envelopes)
    try:
        # Then Flower's queue API counts them
        status, body = _get(f"{flower.url}/api/queues/length")
        assert status == 200, body
        assert {"name": queue, "messages": 3} in body["active_queues"]
        # And its broker page shows a redis:// URL, not the transport's scheme
        status, page = http_get(f"{flower.url}/broker", (USER, PASSWORD))
        assert status == 200
        assert b"redis://" in page
        assert b"itrain://" not in page
        assert _get(f"{flower.url}/api/queues/length", auth=False)[0] == 401
    finally:
        for envelope in envelopes:
            redis_client.lrem(queue, 0, envelope)
