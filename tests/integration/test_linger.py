"""``TrainingClient(linger_ms=...)``: ``train_step`` calls from many threads leave as
``itrain.train_batch`` messages; nothing is lost on ``close()`` or at exit; every handle resolves
to its own event's result, and a send that fails surfaces on each handle and from ``close()``."""

from __future__ import annotations

import base64
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import redis

from producer.client import TrainingClient
from producer.errors import ConfigurationError, InvalidEventError, PublishError, QueueFullError
from producer.keys import ModelKeys
from producer.linger import LingerHandle
from producer.protocol import TASK_TRAIN_BATCH, result_key
from producer.settings import Settings
from tests.helpers import make_event, make_events, statuses, wait_until
from worker.devtools.embedded_redis import free_port

WAIT = 90.0


@pytest.fixture
def queue(redis_client: redis.Redis) -> Iterator[str]:
    """A queue of the test's own, for tests that read the messages instead of training them."""
    name = f"linger-{uuid.uuid4().hex[:8]}"
    yield name
    redis_client.delete(name)


def _messages(redis_client: redis.Redis, queue: str) -> list[dict[str, Any]]:
    """The queue's messages, oldest first, with their decoded body under ``args``."""
    out = []
    for raw in reversed(redis_client.lrange(queue, 0, -1)):
        envelope = orjson.loads(raw)
        envelope["args"] = orjson.loads(base64.b64decode(envelope["body"]))[0]
        out.append(envelope)
    return out


def _from_threads(client: TrainingClient, events: list[dict[str, Any]], threads: int) -> list[Any]:
    handles: list[Any] = [None] * len(events)

    def send(k: int) -> None:
        for i in range(k, len(events), threads):
            handles[i] = client.train_step(events[i])

    workers = [threading.Thread(target=send, args=(k,)) for k in range(threads)]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    return handles


def test_linger_from_threads_loses_nothing_on_close(
    start_workers, make_model, redis_url: str, client: TrainingClient, redis_client: redis.Redis
) -> None:
    # Given a worker, a model, and a client that lingers long enough for close() to find events
    model = make_model()
    start_workers(1)
    n = 600
    events = make_events(model, n, f"linger-{uuid.uuid4().hex[:6]}")
    lingering = TrainingClient(redis_url=redis_url, linger_ms=50)
    # When 4 threads call train_step, and the client is closed at once
    handles = _from_threads(lingering, events, threads=4)
    lingering.close()
    # Then every event trains, each exactly once, and each handle holds its own event's result
    results = client.wait_all(handles, timeout=WAIT)
    assert statuses(results) == {"trained": n}
    assert [r["event_id"] for r in results] == [e["event_id"] for e in events]
    assert sorted(r["step"] for r in results) == list(range(1, n + 1))
    assert int(redis_client.hget(ModelKeys(model).ckpt, "step") or 0) == n
    # and each keeps a result of its own under celery-task-meta-<id>, as any train_step
    assert all(redis_client.exists(result_key(h.id)) for h in handles)


def test_linger_handles_resolve_to_their_own_results(start_workers, make_model, redis_url: str) -> None:
    # Given a worker and a lingering client
    model = make_model()
    start_workers(1)
    events = make_events(model, 20, f"own-{uuid.uuid4().hex[:6]}")
    with TrainingClient(redis_url=redis_url, linger_ms=5) as lingering:
        # When events are sent one call at a time
        handles = [lingering.train_step(e) for e in events]
        # Then each handle is an AsyncResult that get() resolves to its event's result
        assert all(isinstance(h, LingerHandle) for h in handles)
        got = [h.get(timeout=WAIT) for h in handles]
        assert [g["event_id"] for g in got] == [e["event_id"] for e in events]
        assert {g["status"] for g in got} == {"trained"}
        assert all(h.state == "SUCCESS" and h.ready() for h in handles)
        # and wait_all reads them too
        assert lingering.wait_all(handles, timeout=WAIT) == got


def test_linger_sends_train_batch_messages_bounded_in_size(
    redis_url: str, redis_client: redis.Redis, queue: str
) -> None:
    # Given a client that lingers for a long time and sends at most 4 events a message
    settings = Settings(redis_url=redis_url, queue=queue, chunk_size=4)
    lingering = TrainingClient(settings=settings, linger_ms=60_000)
    # When 10 events with results and 3 without are sent
    kept = [lingering.train_step(e) for e in make_events("default", 10, "kept")]
    dropped = [lingering.train_step(e, result=False) for e in make_events("default", 3, "dropped")]
    # Then full buffers leave at once, by 4 events; the rest wait
    assert [len(m["args"][0]) for m in _messages(redis_client, queue)] == [4, 4]
    lingering.close()
    messages = _messages(redis_client, queue)
    # and close() sends the rest: train_batch messages in the [ids, events] format, shown in
    # Flower as "[N events]", results ignored only for the result=False buffer
    assert sorted(len(m["args"][0]) for m in messages) == [2, 3, 4, 4]
    for m in messages:
        ids, sent = m["args"]
        assert m["headers"]["task"] == TASK_TRAIN_BATCH
        assert m["headers"]["argsrepr"] == f"[{len(ids)} events]"
        assert len(sent) == len(ids)
    by_id = {i: (m["headers"]["ignore_result"], e) for m in messages for i, e in zip(*m["args"], strict=True)}
    assert [by_id[h.id][1]["event_id"] for h in kept] == [f"kept-{i}" for i in range(10)]
    assert [by_id[h.id][1]["event_id"] for h in dropped] == [f"dropped-{i}" for i in range(3)]
    assert {by_id[h.id][0] for h in kept} == {False}
    assert {by_id[h.id][0] for h in dropped} == {True}


def test_linger_sends_within_linger_ms_without_close(
    redis_url: str, redis_client: redis.Redis, queue: str
) -> None:
    # Given a client that lingers 20 ms
    with TrainingClient(settings=Settings(redis_url=redis_url, queue=queue), linger_ms=20) as lingering:
        # When a few events are sent and the caller does nothing more
        for e in make_events("default", 3, "timer"):
            lingering.train_step(e)
        # Then they leave on their own, as one message
        wait_until(lambda: redis_client.llen(queue) == 1, 10, "the lingering batch")
        time.sleep(0.1)
        assert [len(m["args"][0]) for m in _messages(redis_client, queue)] == [3]


def test_linger_failed_send_surfaces_on_handles_and_close() -> None:
    # Given a lingering client pointed at a port where nothing listens
    settings = Settings(redis_url=f"redis://127.0.0.1:{free_port()}/0", publish_timeout=0.3)
    lingering = TrainingClient(settings=settings, linger_ms=5)
    # When events are sent, the calls return handles at once
    handles = [lingering.train_step(e) for e in make_events("default", 5, "away")]
    ignored = lingering.train_step(make_event("default", 5, "away"), result=False)
    # Then each handle raises the send's PublishError, naming the URL, and reports FAILURE
    for h in [*handles, ignored]:
        with pytest.raises(PublishError, match=r"127\.0\.0\.1"):
            h.get(timeout=WAIT)
        assert h.state == "FAILURE"
        assert h.ready()
        assert isinstance(h.result, PublishError)
    # and so do wait_all and close()
    with pytest.raises(PublishError):
        lingering.wait_all(handles, timeout=WAIT)
    with pytest.raises(PublishError, match=r"127\.0\.0\.1"):
        lingering.close()


def test_linger_full_queue_surfaces_on_handles_and_close(
    redis_url: str, redis_client: redis.Redis, queue: str
) -> None:
    # Given a queue already at ITRAIN_MAX_QUEUE_LENGTH
    redis_client.lpush(queue, b"placeholder")
    settings = Settings(redis_url=redis_url, queue=queue, max_queue_length=1)
    lingering = TrainingClient(settings=settings, linger_ms=5)
    # When events are sent with linger
    handles = [lingering.train_step(e) for e in make_events("default", 3, "full")]
    # Then each handle raises QueueFullError, close() too, and nothing was enqueued
    for h in handles:
        with pytest.raises(QueueFullError, match="ITRAIN_MAX_QUEUE_LENGTH"):
            h.get(timeout=WAIT)
    with pytest.raises(QueueFullError):
        lingering.close()
    assert redis_client.llen(queue) == 1


def test_linger_flushes_at_interpreter_exit(redis_url: str, redis_client: redis.Redis, queue: str) -> None:
    # Given a process that lingers a minute and exits without close()
    script = (
        "from producer.client import TrainingClient\n"
        "from producer.settings import Settings\n"
        "from tests.helpers import make_events\n"
        f"c = TrainingClient(settings=Settings(redis_url={redis_url!r}, queue={queue!r}), linger_ms=60_000)\n"
        "for e in make_events('default', 7, 'exit'):\n"
        "    c.train_step(e)\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=60)
    # Then its events were sent at exit
    assert [len(m["args"][0]) for m in _messages(redis_client, queue)] == [7]


def test_linger_ms_must_not_be_negative(redis_url: str) -> None:
    with pytest.raises(ConfigurationError, match="linger_ms"):
        TrainingClient(redis_url=redis_url, linger_ms=-1)


# Python 3.12+ warns on fork() in a process with threads; the child does its part and exits at once.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_linger_in_a_forked_child_sends_its_own_events_only(
    redis_url: str, redis_client: redis.Redis, queue: str
) -> None:
    # Given a lingering client that has sent once (a connection held) and has an event buffered
    settings = Settings(redis_url=redis_url, queue=queue)
    lingering = TrainingClient(settings=settings, linger_ms=60_000)
    lingering.queue_length()
    lingering.train_step(make_event("default", 0, "parent"))
    # When the process forks and the child sends and closes
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            for e in make_events("default", 2, "child"):
                lingering.train_step(e)
            lingering.close()
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    lingering.close()
    # Then the child sent its two events, the parent its one: nothing twice, nothing lost
    sent = sorted(e["event_id"] for m in _messages(redis_client, queue) for e in m["args"][1])
    assert sent == ["child-0", "child-1", "parent-0"]


def test_linger_bounds_messages_in_bytes(redis_url: str, redis_client: redis.Redis, queue: str) -> None:
    # Given a client whose messages may carry 4 KiB, and events of about 700 bytes
    settings = Settings(redis_url=redis_url, queue=queue, max_message_bytes=4096)
    lingering = TrainingClient(settings=settings, linger_ms=60_000)
    wide = {f"k{i}": "v" * 200 for i in range(3)}
    # When 12 of them are sent, then messages leave as they fill up, each within the limit
    for e in make_events("default", 12, "wide", context=wide):
        lingering.train_step(e)
    # and an event too large for any message is refused at the call, naming the setting
    huge = {f"k{i}": "v" * 256 for i in range(20)}
    with pytest.raises(InvalidEventError, match="ITRAIN_MAX_MESSAGE_BYTES"):
        lingering.train_step(make_event("default", 99, "huge", context=huge))
    lingering.close()
    messages = _messages(redis_client, queue)
    assert sum(len(m["args"][0]) for m in messages) == 12
    assert len(messages) >= 3
    assert all(len(base64.b64decode(m["body"])) <= 4096 for m in messages)
