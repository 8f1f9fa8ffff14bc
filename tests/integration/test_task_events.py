"""Task events are published in batches, and still tell every task's story.

A real worker trains a few hundred ``train_step`` messages. Two listeners on the private
redis-server: a pattern subscription to the ``celeryev`` fanout channels counts the ``PUBLISH``
commands that carry this test's events, and Celery's own ``EventReceiver`` (what Flower runs)
decodes them. Every task must be seen as received, then succeeded, with its name, in far fewer
publishes than events.
"""

from __future__ import annotations

import base64
import signal
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import orjson
import redis
from celery.events.dispatcher import EventDispatcher

from producer.celery_config import make_celery
from producer.client import TrainingClient
from producer.protocol import TASK_TRAIN_STEP, encode_envelope, new_task_id, result_key
from producer.settings import Settings
from tests.helpers import create_model, make_events, wait_until
from worker.consume.task_events import JsonDispatcher

N = 300
WAIT = 120.0


class _Publishes:
    """Counts the PUBLISH commands on the ``celeryev`` channels and the task events in each."""

    def __init__(self, client: redis.Redis) -> None:
        self.pubsub = client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.psubscribe("*celeryev*")
        self.bodies: list[Any] = []
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            message = self.pubsub.get_message(timeout=0.1)
            if message and message["type"] == "pmessage":
                try:
                    envelope = orjson.loads(message["data"])
                    self.bodies.append(orjson.loads(base64.b64decode(envelope["body"])))
                except ValueError as exc:  # kept for the assertion, not lost with this thread
                    self.errors.append(f"{exc!r} in {message['data'][:200]!r}")

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.pubsub.close()

    def carrying(self, ids: set[str]) -> list[list[dict[str, Any]]]:
        """The publishes that carry at least one event of ``ids``, as lists of events."""
        out = []
        for body in self.bodies:
            events = body if isinstance(body, list) else [body]
            if any(e.get("uuid") in ids for e in events):
                out.append(events)
        return out


class _Receiver:
    """Celery's ``EventReceiver`` in a thread, recording each task's event types in order."""

    def __init__(self, redis_url: str) -> None:
        self.app = make_celery(Settings(redis_url=redis_url), main="itrain-test-events")
        self.seen: dict[str, list[str]] = defaultdict(list)
        self.names: dict[str, str] = {}
        self.ready = threading.Event()
        self.receiver: Any = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        assert self.ready.wait(30), "the event receiver did not start"

    def _on_event(self, event: dict[str, Any]) -> None:
        if "uuid" in event:
            self.seen[event["uuid"]].append(event["type"])
            if "name" in event:
                self.names[event["uuid"]] = event["name"]

    def _run(self) -> None:
        with self.app.connection_for_read() as conn:
            self.receiver = self.app.events.Receiver(conn, handlers={"*": self._on_event})
            self.receiver.on_consume_ready = lambda *a, **k: self.ready.set()
            self.receiver.capture(limit=None, timeout=None, wakeup=False)

    def close(self) -> None:
        if self.receiver is not None:
            self.receiver.should_stop = True
        self.thread.join(10)
        self.app.close()


@contextmanager
def _listeners(redis_url: str, redis_client: redis.Redis) -> Iterator[tuple[_Publishes, _Receiver]]:
    publishes = _Publishes(redis_client)
    receiver = _Receiver(redis_url)
    try:
        yield publishes, receiver
    finally:
        receiver.close()
        publishes.close()


def test_task_events_are_published_in_batches_and_every_task_is_seen(
    start_workers: Any, redis_url: str, redis_client: redis.Redis
) -> None:
    # Given a worker, a model, and listeners on the event channels
    queue = f"itrain-events-{uuid.uuid4().hex[:8]}"
    settings = Settings(redis_url=redis_url, queue=queue)
    (worker,) = start_workers(1, env={"ITRAIN_QUEUE": queue})
    model = create_model(redis_client, settings)
    events = make_events(model, N, f"ev-{uuid.uuid4().hex[:6]}")
    with _listeners(redis_url, redis_client) as (publishes, receiver):
        # When N train_step messages are trained
        ids = [new_task_id() for _ in events]
        redis_client.lpush(
            queue,
            *[encode_envelope(TASK_TRAIN_STEP, i, [e], queue) for i, e in zip(ids, events, strict=True)],
        )
        with TrainingClient(settings=settings) as client:
            results = client.wait_all([client.app.AsyncResult(i) for i in ids], timeout=WAIT)
        assert Counter(r["status"] for r in results) == {"trained": N}

        # Then every task is seen received, then succeeded, under its name
        wanted = set(ids)
        wait_until(
            lambda: all(receiver.seen.get(i) == ["task-received", "task-succeeded"] for i in ids),
            30,
            "every task's received and succeeded events",
        )
        assert {receiver.names[i] for i in ids} == {TASK_TRAIN_STEP}
        assert worker.poll() is None

        # ... in far fewer publishes than events. This listener reads the same publishes in a
        # thread of its own, and on a busy machine may still be behind the receiver, by the last
        # publish or two (a count taken at once found 400 of 600): wait until it has them all.
        def ours() -> int:
            return sum(1 for batch in publishes.carrying(wanted) for e in batch if e.get("uuid") in wanted)

        wait_until(lambda: ours() >= 2 * N or publishes.errors, 30, f"the {2 * N} task events' publishes")
        assert not publishes.errors
        assert ours() == 2 * N
        carrying = publishes.carrying(wanted)
        # Celery alone publishes about one message per event here (one per loop tick).
        assert len(carrying) * 4 <= 2 * N, f"{len(carrying)} publishes for {2 * N} events"
        print(f"\n{len(carrying)} publishes for {2 * N} task events")


def test_events_of_the_last_jobs_are_published_at_warm_shutdown(
    start_workers: Any, redis_url: str, redis_client: redis.Redis
) -> None:
    # Given a worker in the middle of a stream (a slow model, so a job is in flight)
    queue = f"itrain-events-{uuid.uuid4().hex[:8]}"
    settings = Settings(redis_url=redis_url, queue=queue)
    (worker,) = start_workers(1, env={"ITRAIN_QUEUE": queue, "ITRAIN_BATCH_MAX": "50"})
    model = create_model(redis_client, settings, hidden=512)
    events = make_events(model, 3000, f"sd-{uuid.uuid4().hex[:6]}")
    with _listeners(redis_url, redis_client) as (_, receiver):
        ids = [new_task_id() for _ in events]
        redis_client.lpush(
            queue,
            *[encode_envelope(TASK_TRAIN_STEP, i, [e], queue) for i, e in zip(ids, events, strict=True)],
        )
        keys = [result_key(i) for i in ids]
        wait_until(lambda: sum(v is not None for v in redis_client.mget(keys)) >= 300, WAIT, "300 results")

        # When it is told to stop (warm shutdown: the pool finishes its job first)
        worker.send_signal(signal.SIGTERM)
        assert worker.wait(60) == 0

        # Then every task that has a result and was acknowledged was also published as succeeded.
        # (Celery's prefork shutdown sometimes gives up on the pool's last job after 30 s: that
        # job's messages are restored to the queue unacknowledged, to be trained again as
        # ``duplicate``, and the main process never learns they finished.)
        restored = {orjson.loads(m)["headers"]["id"] for m in redis_client.lrange(queue, 0, -1)}
        done = [i for i, v in zip(ids, redis_client.mget(keys), strict=True) if v is not None]
        assert len(done) < len(ids), "the stream ended before the shutdown"
        done = [i for i in done if i not in restored]
        wait_until(
            lambda: all("task-succeeded" in receiver.seen.get(i, []) for i in done),
            10,
            "the succeeded events of every finished task",
        )


def _until_listening(publishes: _Publishes, receiver: _Receiver, conn: Any, app: Any) -> None:
    """Returns once both listeners hear a probe event: a receiver ready to consume has not always
    subscribed to the fanout channel yet, and an event published before is heard by no one."""
    probe = EventDispatcher(conn, app=app, hostname="probe@test")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        task_id = f"probe-{uuid.uuid4().hex[:6]}"
        probe.send("task-received", uuid=task_id, name=TASK_TRAIN_STEP)
        heard = time.monotonic() + 0.5
        while time.monotonic() < heard:
            if task_id in receiver.seen and publishes.carrying({task_id}):
                return
            time.sleep(0.02)
    raise AssertionError("the event listeners heard no probe within 30 s")


def test_the_orjson_dispatcher_publishes_what_celerys_would(
    redis_url: str, redis_client: redis.Redis
) -> None:
    """``JsonDispatcher`` encodes a batch with orjson; the events Celery's receiver (Flower) reads
    are those Celery's own dispatcher would have published, and a value orjson cannot encode goes
    Celery's way."""
    app = make_celery(Settings(redis_url=redis_url), main="itrain-test-dispatch")
    fields = {"result": "{'status': 'trained', 'step': 7}", "runtime": 0.0012, "args": "[1 events]"}
    sent: dict[str, set[str]] = {}
    with _listeners(redis_url, redis_client) as (publishes, receiver), app.connection_for_write() as conn:
        _until_listening(publishes, receiver, conn, app)
        # When each dispatcher publishes a batch of two task events, and ours one with an integer
        # beyond 64 bits besides
        for cls in (EventDispatcher, JsonDispatcher):
            dispatcher = cls(conn, app=app, hostname="h@test", buffer_group=["task"], buffer_limit=100)
            ids = [f"{cls.__name__}-{k}-{uuid.uuid4().hex[:6]}" for k in range(2)]
            for task_id in ids:
                dispatcher.send("task-succeeded", uuid=task_id, name=TASK_TRAIN_STEP, **fields)
            dispatcher.flush()
            sent[cls.__name__] = set(ids)
        big = f"big-{uuid.uuid4().hex[:6]}"
        dispatcher.send("task-succeeded", uuid=big, name=TASK_TRAIN_STEP, huge=2**70, **fields)
        dispatcher.flush()
        everything = set().union(*sent.values(), {big})
        wait_until(lambda: set(receiver.seen) >= everything, 30, "every event received")
        wait_until(lambda: len(publishes.carrying(everything)) == 3, 30, "three publishes")
    # Then Celery's receiver read each event, and each batch was one publish of the same JSON
    assert publishes.errors == []
    assert {k: receiver.seen[k] for k in everything} == {k: ["task-succeeded"] for k in everything}
    bodies = {cls: publishes.carrying(ids) for cls, ids in sent.items()}

    def comparable(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        drop = {"uuid", "clock", "timestamp", "utcoffset", "pid"}
        return [{k: v for k, v in e.items() if k not in drop} for e in events]

    (theirs,), (ours,) = bodies["EventDispatcher"], bodies["JsonDispatcher"]
    assert comparable(ours) == comparable(theirs)
    assert sorted(ours[0]) == sorted(theirs[0])
    (fallback,) = publishes.carrying({big})
    assert fallback[0]["huge"] == 2**70
    app.close()
