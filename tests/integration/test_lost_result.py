"""A message that comes back after its commit survived and its result did not (what a failover can
keep: the promoted replica holds a prefix of the old master's stream, and a batch's results are
written after its commit) answers ``trained`` with the event's step, not ``duplicate``; a re-send of
the event under another id still answers ``duplicate``. Real Redis, real worker: the loss is made
by deleting the result keys, the redelivery by pushing the very same message again."""

from __future__ import annotations

import time
from typing import Any

import orjson
import redis
from celery.result import AsyncResult

from producer.chunks import parse_handle_id
from producer.client import TrainingClient
from producer.keys import ModelKeys, marker_field, slot_seconds
from producer.protocol import result_key
from producer.stats import read_stats
from tests.helpers import Workers, make_events, model_state, raw_event, wait_results, wait_until
from tests.integration.test_guard import RATIO, WINDOW, labelled
from tests.integration.test_run_messages import batch_message, meta, new_id, own_runtime, step_message
from worker.consume.runtime import Runtime, run_messages
from worker.engine.guard import Guard
from worker.store.guard import set_guard
from worker.store.markers import own_trained, parse_mark
from worker.store.model_store import Store
from worker.store.snapshots import take_snapshot

TIMEOUT = 90.0

__all__ = ["own_runtime"]  # the fixture, imported for the tests below


def test_redelivered_message_whose_result_was_lost_answers_trained(
    make_model: Any, redis_client: redis.Redis, redis_url: str, workers: Workers, client: TrainingClient
) -> None:
    # Given a train_step message and a train_many chunk, copied off the queue as sent
    model = make_model()
    single, *many = make_events(model, 4, "lost")
    queue = client.settings.queue
    h = client.train_step(single)
    hs = client.train_many(many)
    raw = redis_client.lrange(queue, 0, -1)
    assert len(raw) == 2, raw
    (worker,) = workers.start(1, redis_url=redis_url)
    first = wait_results(client, [h, *hs], TIMEOUT, workers)
    steps = {r["event_id"]: r["step"] for r in first}
    assert [r["status"] for r in first] == ["trained"] * 4, first
    assert sorted(steps.values()) == [1, 2, 3, 4]
    # When their results are lost (the commit kept) and the same messages are delivered again
    chunk_id = parse_chunk(hs[0].id)
    lost = [result_key(h.id), result_key(chunk_id)]
    assert redis_client.delete(*lost) == 2
    for message in raw:
        redis_client.lpush(queue, message)
    wait_until(lambda: redis_client.exists(*lost) == 2, TIMEOUT, "the redelivered messages' results")
    # Then each event answers trained with the step it trained at, and nothing trained again
    again = wait_results(client, [AsyncResult(h.id, app=client.app), *hs], TIMEOUT, workers)
    version = model_state(redis_client, model)["version"]
    for r in again:
        assert r["status"] == "trained", r
        assert r["step"] == steps[r["event_id"]], (r, steps)
        assert r["loss"] is None, r  # the loss of that update is not kept
        assert r["version"] == version, r
    assert model_state(redis_client, model)["step"] == 4
    # And a re-send of the same events under new ids answers duplicate
    resent = wait_results(client, [client.train_step(single), *client.train_many(many)], TIMEOUT, workers)
    assert [r["status"] for r in resent] == ["duplicate"] * 4, resent
    workers.assert_alive([worker])


def test_result_still_there_is_kept_on_redelivery(
    make_model: Any, redis_client: redis.Redis, redis_url: str, workers: Workers, client: TrainingClient
) -> None:
    # Given a message trained and answered
    model = make_model()
    (event,) = make_events(model, 1, "kept")
    h = client.train_step(event)
    (raw,) = redis_client.lrange(client.settings.queue, 0, -1)
    workers.start(1, redis_url=redis_url)
    (first,) = wait_results(client, [h], TIMEOUT, workers)
    assert first["status"] == "trained", first
    assert isinstance(first["loss"], float), first
    stored = redis_client.get(result_key(h.id))
    # When it is delivered again with its result still there, then a re-send under a new id
    redis_client.lpush(client.settings.queue, raw)
    (resent,) = wait_results(client, [client.train_step(event)], TIMEOUT, workers)
    # Then the re-send is a duplicate and the first result is untouched (write-once)
    assert resent["status"] == "duplicate", resent
    wait_until(lambda: redis_client.llen(client.settings.queue) == 0, TIMEOUT, "the queue to drain")
    assert orjson.loads(redis_client.get(result_key(h.id)) or b"") == orjson.loads(stored or b"")


def parse_chunk(handle: str) -> str:
    parsed = parse_handle_id(handle)
    assert parsed is not None, handle
    return parsed[0]


def test_marker_names_the_result_that_trained_it_and_old_markers_still_read(
    store: Store, make_model: Any
) -> None:
    # Given a commit that names its results, and a marker as an older worker wrote it (the step alone)
    model = make_model()
    ckpt = store.load(model)
    assert ckpt is not None
    done = store.commit(
        model,
        expected=ckpt,
        params=ckpt.theta.tobytes(),
        event_ids=["e1", "e2"],
        result_ids=["task-1", "chunk:1"],
        loss_last=0.5,
        loss_ema=0.5,
        actions={"click": 2},
        history=[],
        dead=[],
    )
    assert done.ok
    slot = int(time.time() // slot_seconds(store.settings.dedupe_ttl))
    old_key = ModelKeys(model).done(ckpt.gen, slot)
    store.client.hset(old_key, marker_field("old"), 7)
    # When the markers are read with the checkpoint
    read = store.read(model, None, ["e1", "never", "e2", "old"])
    # Then each found marker holds its step, and names its own result id only
    assert read.done == [True, False, True, True]
    assert sorted(read.marks) == [0, 2, 3]
    own = own_trained(read.marks[0], "task-1", model, "e1", 9)
    assert own is not None
    assert own.result == {
        "status": "trained",
        "model": model,
        "event_id": "e1",
        "step": 1,
        "version": 9,
        "loss": None,
    }
    chunk_entry = own_trained(read.marks[2], "chunk:1", model, "e2", 9)
    assert chunk_entry is not None
    assert chunk_entry.result["step"] == 2
    assert own_trained(read.marks[0], "task-2", model, "e1", 9) is None  # a re-send: duplicate
    old = parse_mark(read.marks[3])
    assert old is not None
    assert old.step == 7
    assert old.digest is None
    assert own_trained(read.marks[3], "task-1", model, "old", 9) is None  # older marker: as before
    # And a batch where nothing is marked gets the short reply (no values)
    assert store.read(model, None, ["never"]).marks == {}


def test_message_past_the_delivery_limit_whose_result_was_lost_answers_trained(
    own_runtime: Runtime, make_model: Any, redis_client: redis.Redis
) -> None:
    # Given an event trained by a message whose result was then lost
    model = make_model()
    event = raw_event(model, "limit")
    run_messages([step_message("limit-task", event)])
    redis_client.delete(result_key("limit-task"))
    # When that message comes back once too often (refused: answered without training), and the
    # event is also sent under another id that is refused the same way
    too_many = own_runtime.settings.max_deliveries + 1
    run_messages([step_message("limit-task", event, too_many), step_message("other-task", event, too_many)])
    # Then the message that trained it says so with its step; the other one is a duplicate
    own, other = meta(redis_client, "limit-task"), meta(redis_client, "other-task")
    assert own is not None
    assert own["result"]["status"] == "trained", own
    assert own["result"]["step"] == 1, own
    assert other is not None
    assert other["result"]["status"] == "duplicate", other
    assert model_state(redis_client, model)["step"] == 1


def test_redelivered_message_whose_result_was_lost_answers_trained_on_a_trip_and_while_paused(
    own_runtime: Runtime, make_model: Any, redis_client: redis.Redis
) -> None:
    # Given a guarded model with a snapshot, and an event trained by a message whose result was lost
    model = make_model(lr=0.5)
    set_guard(redis_client, model, Guard(WINDOW, RATIO), own_runtime.settings)
    for k in range(6):
        run_messages([batch_message([new_id() for _ in range(20)], labelled(model, f"good{k}-", 20))])
    take_snapshot(redis_client, model, keep=10)
    own = labelled(model, "own-", 1)[0]
    run_messages([step_message("own-task", own)])
    first = meta(redis_client, "own-task")
    assert first is not None
    assert first["result"]["status"] == "trained", first
    trained_at = first["result"]["step"]

    # When that message comes back (its result lost again) in the batch on which the guard trips
    tripped = False
    for k in range(20):
        redis_client.delete(result_key("own-task"))
        ids = [new_id() for _ in range(5)]
        bad = labelled(model, f"bad{k}-", 5, flipped=True)
        run_messages([step_message("own-task", own, 2), batch_message(ids, bad)])
        refused = meta(redis_client, ids[0])
        assert refused is not None
        if refused["status"] == "FAILURE":
            assert refused["result"]["exc_type"] == "GuardTrippedError", refused
            tripped = True
            break
    assert tripped, "the guard never tripped on flipped labels"
    # Then it answers trained with the step it trained at, as on a commit (not duplicate)
    again = meta(redis_client, "own-task")
    assert again is not None
    assert again["status"] == "SUCCESS", again
    assert (again["result"]["status"], again["result"]["step"]) == ("trained", trained_at), again
    assert again["result"]["loss"] is None, again
    assert read_stats(redis_client, model)["eval"]["guard"]["paused"] is True

    # When it comes back once more while the model is paused, with the event re-sent under
    # another id and a new event
    redis_client.delete(result_key("own-task"))
    steps = model_state(redis_client, model)["step"]
    fresh = labelled(model, "fresh-", 1)[0]
    run_messages(
        [step_message("own-task", own, 3), step_message("other-task", own), step_message("fresh-task", fresh)]
    )
    # Then the message that trained it says so with its step; the re-send is a duplicate; the
    # new event is refused; nothing trained
    paused_own, other, refused_new = (
        meta(redis_client, "own-task"),
        meta(redis_client, "other-task"),
        meta(redis_client, "fresh-task"),
    )
    assert paused_own is not None
    assert (paused_own["result"]["status"], paused_own["result"]["step"]) == ("trained", trained_at)
    assert paused_own["result"]["version"] == model_state(redis_client, model)["version"]
    assert other is not None
    assert other["result"]["status"] == "duplicate", other
    assert refused_new is not None
    assert refused_new["status"] == "FAILURE", refused_new
    assert model_state(redis_client, model)["step"] == steps
