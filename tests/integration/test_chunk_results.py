"""One result per ``train_many`` chunk, against a real Redis: what ``run_messages`` writes, how the
handles read it (``producer.handles.ChunkHandle``), and the write-once rule entry by entry."""

from __future__ import annotations

import functools
import os
import threading
import uuid
from collections.abc import Callable
from typing import Any

import orjson
import pytest
import redis

from producer.chunks import handle_id
from producer.client import TrainingClient
from producer.errors import InvalidEventError, LockTimeoutError
from producer.protocol import TASK_TRAIN_BATCH, result_key
from producer.settings import Settings
from tests.helpers import raw_event
from tests.integration.test_run_messages import body_of, meta, own_runtime, result_keys, step, step_message
from worker.consume import runtime
from worker.consume.messages import RawMessage
from worker.consume.runtime import Runtime, Summary, run_messages
from worker.devtools.forwarder import Forwarder
from worker.store.results import ChunkResult, Outcome, write_results

__all__ = ["own_runtime"]  # the fixture, imported for the tests below

BAD_TIMESTAMP = "0001-01-01T00:00:00+01:00"


def chunk_message(
    events: list[Any], chunk_id: str | None = None, *, ignore_result: bool = False
) -> RawMessage:
    return RawMessage(
        TASK_TRAIN_BATCH,
        chunk_id or str(uuid.uuid4()),
        "application/json",
        "utf-8",
        None,
        body_of([events]),
        ignore_result=ignore_result,
    )


@pytest.fixture(params=[False, True], ids=["results-after", "results-with-commit"])
def run(request: pytest.FixtureRequest) -> Callable[[list[RawMessage]], list[Summary]]:
    """``run_messages``, with the results written after the commit or riding in its round trip
    (as a worker runs it): a chunk's result rides when its commit answers all of its events."""
    return functools.partial(run_messages, results_with_commit=request.param)


@pytest.fixture
def reader(redis_url: str) -> Any:
    with TrainingClient(redis_url) as client:
        yield client


def test_chunk_writes_one_result_that_every_handle_reads(
    run, own_runtime, make_model, redis_client, reader
) -> None:
    # Given a chunk of three events, the second with a date before year 1 in UTC
    model = make_model()
    events = [raw_event(model, "a"), raw_event(model, "b", timestamp=BAD_TIMESTAMP), raw_event(model, "c")]
    msg = chunk_message(events)
    before = result_keys(redis_client)
    # When the pool-process code runs it
    (summary,) = run([msg])
    # Then the message reports its counts, and exactly one result key was written: the chunk's
    assert summary[2] == {"events": 3, "trained": 2, "failed": 1}
    assert result_keys(redis_client) == before + 1
    stored = meta(redis_client, msg.task_id)
    assert stored is not None
    assert stored["result"]["ids"] == ["a", "b", "c"]
    assert stored["result"]["model"] == model
    # And each event's handle, remade from its id, reads its own entry as a full result object
    handles = [reader.handle(handle_id(msg.task_id, i)) for i in range(3)]
    assert [h.state for h in handles] == ["SUCCESS", "FAILURE", "SUCCESS"]
    assert all(h.ready() for h in handles)
    first = handles[0].get(timeout=5)
    assert first == {
        "status": "trained",
        "model": model,
        "event_id": "a",
        "step": 1,
        "version": first["version"],
        "loss": first["loss"],
    }
    assert handles[2].get(timeout=5)["step"] == 2
    with pytest.raises(InvalidEventError, match="timestamp"):
        handles[1].get(timeout=5)
    # And wait_all reads them in bulk, the failure as its exception
    results = reader.wait_all(handles, timeout=5)
    assert [r["event_id"] if isinstance(r, dict) else type(r).__name__ for r in results] == [
        "a",
        "InvalidEventError",
        "c",
    ]
    assert step(redis_client, model) == 2


def test_handle_get_wakes_when_the_chunk_result_lands(run, own_runtime, make_model, reader) -> None:
    # Given a caller already waiting on the last event of a chunk that has not run yet
    model = make_model()
    msg = chunk_message([raw_event(model, f"w{i}") for i in range(4)])
    handle = reader.handle(handle_id(msg.task_id, 3))
    assert handle.state == "PENDING"
    assert not handle.ready()
    got: list[Any] = []
    waiter = threading.Thread(target=lambda: got.append(handle.get(timeout=20)))
    waiter.start()
    # When the chunk runs
    run([msg])
    waiter.join(25)
    # Then the waiting get() returned that event's result
    assert not waiter.is_alive()
    assert got[0]["event_id"] == "w3"
    assert got[0]["status"] == "trained"


def test_redelivered_chunk_keeps_trained_entries(run, own_runtime, make_model, redis_client) -> None:
    # Given a chunk that trained
    model = make_model()
    msg = chunk_message([raw_event(model, "r1"), raw_event(model, "r2")])
    run([msg])
    first = redis_client.get(result_key(msg.task_id))
    # When it is delivered again (its events' markers name this very chunk: they answer trained,
    # with their steps, as after a failover that lost the result; worker.store.markers)
    (summary,) = run([msg])
    # Then its stored result is unchanged: nothing replaces trained
    assert summary[2] == {"events": 2, "trained": 2}
    assert redis_client.get(result_key(msg.task_id)) == first
    assert step(redis_client, model) == 2


def test_trained_entry_replaces_an_earlier_failure_of_that_event(
    run, own_runtime, make_model, redis_client
) -> None:
    # Given a chunk whose first delivery ended its first event as a lock_timeout FAILURE (the
    # worker then died before acking), the second event not answered at all
    model = make_model()
    msg = chunk_message([raw_event(model, "f1"), raw_event(model, "f2")])
    timeout = Outcome.failure(handle_id(msg.task_id, 0), LockTimeoutError("lock_timeout"), event_id="f1")
    write_results(redis_client, [ChunkResult(msg.task_id, 2, [timeout])], 60)
    assert meta(redis_client, msg.task_id)["result"]["results"][0]["exc_type"] == "LockTimeoutError"
    # When the redelivery trains both
    run([msg])
    # Then both entries say trained, with their steps
    entries = meta(redis_client, msg.task_id)["result"]["results"]
    assert [e[0] for e in entries] == [1, 2]


def test_results_of_one_event_and_of_a_chunk_never_replace_each_other(
    run, own_runtime, make_model, redis_client
) -> None:
    # Given a trained chunk, and a train_step message that names the chunk's id
    model = make_model()
    chunk = chunk_message([raw_event(model, "k1")])
    run([chunk])
    stored = redis_client.get(result_key(chunk.task_id))
    run([step_message(chunk.task_id, raw_event(model, "k2"))])
    # Then the chunk's result stands
    assert redis_client.get(result_key(chunk.task_id)) == stored
    # And given a train_step result, a chunk naming its id does not replace it either
    single = str(uuid.uuid4())
    run([step_message(single, raw_event(model, "k3"))])
    stored = redis_client.get(result_key(single))
    run([chunk_message([raw_event(model, "k4")], single)])
    assert redis_client.get(result_key(single)) == stored
    assert orjson.loads(stored)["result"]["event_id"] == "k3"


def test_fire_and_forget_chunk_writes_nothing(
    run, own_runtime, make_model, redis_client: redis.Redis
) -> None:
    model = make_model()
    msg = chunk_message([raw_event(model, "s1"), raw_event(model, "s2")], ignore_result=True)
    (summary,) = run([msg])
    assert summary[2] == {"events": 2, "trained": 2}
    assert redis_client.exists(result_key(msg.task_id)) == 0


def test_a_chunks_result_rides_in_its_commits_round_trip(
    redis_client: redis.Redis, make_model, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a worker process whose Redis is reached through a forwarder that counts round trips
    port = redis_client.connection_pool.connection_kwargs["port"]
    with Forwarder(port, delay_ms=1) as fwd:
        rt = Runtime(Settings(redis_url=f"redis://127.0.0.1:{fwd.port}/0"))
        rt.idle.delay = 60.0  # (the last lock timings wait: no round trip of theirs in the counts)
        monkeypatch.setattr(runtime, "_runtime", (os.getpid(), rt))
        model = make_model()
        # (its checkpoint cached, the scripts loaded)
        run_messages([chunk_message([raw_event(model, "warm")])], results_with_commit=True)
        # When a chunk of five events runs with its result written after the commit, then one
        # with its result riding in the commit's round trip
        trips: dict[bool, int] = {}
        for ride in (False, True):
            msg = chunk_message([raw_event(model, f"{ride}-{i}") for i in range(5)])
            before = fwd.stats()["round_trips"]
            (summary,) = run_messages([msg], results_with_commit=ride)
            trips[ride] = fwd.stats()["round_trips"] - before
            # Then every event trained and the chunk's one result names each with its step
            assert summary[2] == {"events": 5, "trained": 5}
            entries = meta(redis_client, msg.task_id)["result"]["results"]
            assert [e[0] for e in entries] == [step(redis_client, model) - 4 + i for i in range(5)]
        # And riding saved the results' round trip: lock + read, then commit + release + results
        assert trips == {False: 3, True: 2}
