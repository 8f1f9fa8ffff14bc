"""What an operator pages on, end to end: queue age, time to commit, freshness, dead letters by type.

Real components throughout: the session's private redis-server, real ``celery -A worker worker``
processes on a queue of each test's own, our clients, and the exporter's collector scraping Redis.
"""

from __future__ import annotations

import hashlib
import time
import uuid

import orjson
import redis

from producer.enqueue_time import ENQUEUED_HEADER
from producer.errors import GuardTrippedError
from producer.keys import LATENCY_BUCKETS, QUEUE_HEADS, ModelKeys
from producer.protocol import TASK_TRAIN_BATCH, TASK_TRAIN_STEP, encode_envelope, new_task_id
from tests.helpers import make_events, model_state, raw_event, wait_results, wait_until
from tests.integration.test_exporter import scrape
from worker.consume.queue_heads import QueueHeads
from worker.ops.exporter import ItrainCollector
from worker.outcome import dead_letter_entry
from worker.store.model_store import Store

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def _queue() -> str:
    return f"itrain-om-{uuid.uuid4().hex[:8]}"


def _age(samples: Samples, queue: str) -> float:
    return samples[("itrain_queue_oldest_age_seconds", (("queue", queue),))]


def _bucket(samples: Samples, family: str, model: str, le: str) -> float:
    return samples[(f"{family}_bucket", (("le", le), ("model", model)))]


def _without_enqueue_time(envelope: bytes) -> bytes:
    """A message as another language sends it: no enqueue-time header."""
    message = orjson.loads(envelope)
    del message["headers"][ENQUEUED_HEADER]
    return orjson.dumps(message)


def test_histograms_count_every_trained_event_with_plausible_sums(
    redis_url, redis_client, make_model, make_client, start_workers, workers
) -> None:
    # Given a worker on a queue of its own, and events stamped 100 s before they are sent
    queue = _queue()
    model = make_model()
    start_workers(1, env={"ITRAIN_QUEUE": queue})
    client = make_client(redis_url, queue=queue)
    collector = ItrainCollector(redis_client, [queue])
    stamp = time.time() - 100.0
    many = make_events(model, 1500, tag="om-many", timestamp=stamp)
    steps = make_events(model, 40, tag="om-step", timestamp=stamp)
    # When they train, by train_many and train_step, within a measured wall time
    sent = time.time()
    handles = client.train_many(many) + [client.train_step(e) for e in steps]
    results = wait_results(client, handles, 120, workers)
    wall = time.time() - sent
    after = scrape(collector)
    # Then every trained event is counted once in each histogram, as many as the step says
    assert {r["status"] for r in results} == {"trained"}
    trained = model_state(redis_client, model)["step"]
    assert trained == len(many) + len(steps)
    m = (("model", model),)
    assert after[("itrain_enqueue_to_commit_seconds_count", m)] == trained
    assert after[("itrain_event_freshness_seconds_count", m)] == trained
    # And the sums are plausible: each event's time to commit is within the measured wall time,
    # each event's freshness is its 100 s before sending plus at most that wall time
    to_commit = after[("itrain_enqueue_to_commit_seconds_sum", m)]
    assert 0 < to_commit <= trained * wall
    freshness = after[("itrain_event_freshness_seconds_sum", m)]
    assert trained * (sent - stamp) <= freshness <= trained * (sent - stamp + wall) + 1e-6
    # And the buckets say the same: every freshness between 60 s and 300 s
    for le, expected in (("60.0", 0), ("300.0", trained), ("+Inf", trained)):
        assert _bucket(after, "itrain_event_freshness_seconds", model, le) == expected
    bound = next(b for b in LATENCY_BUCKETS if b >= wall)
    assert _bucket(after, "itrain_enqueue_to_commit_seconds", model, repr(bound)) == trained


def test_oldest_age_grows_while_a_queue_waits_and_drops_when_drained(
    redis_url, redis_client, make_model, make_client, start_workers, workers
) -> None:
    # Given events sent to a queue no worker consumes yet
    queue = _queue()
    model = make_model()
    client = make_client(redis_url, queue=queue)
    collector = ItrainCollector(redis_client, [queue])
    assert _age(scrape(collector), queue) == 0  # an empty queue
    sent = time.time()
    handles = [client.train_step(e) for e in make_events(model, 20, tag="om-wait")]
    # When the queue waits, then waits longer
    time.sleep(1.0)
    first = _age(scrape(collector), queue)
    waited = time.time() - sent
    time.sleep(1.5)
    second = _age(scrape(collector), queue)
    # Then its age is that of its oldest message (the first sent), and grows with the wait
    assert 1.0 <= first <= waited + 0.05
    assert second >= first + 1.4
    # When a worker drains it
    start_workers(1, env={"ITRAIN_QUEUE": queue})
    wait_results(client, handles, 120, workers)
    wait_until(lambda: redis_client.llen(queue) == 0, 10, "the queue to drain")
    # Then the queue's age drops to 0
    assert _age(scrape(collector), queue) == 0


def test_a_message_without_enqueue_time_is_aged_from_a_workers_first_sight(
    redis_url, redis_client, make_model, start_workers, workers
) -> None:
    # Given a worker on a queue, told to stop taking from it (an operator's cancel_consumer)
    queue = _queue()
    model = make_model()
    (proc,) = start_workers(1, env={"ITRAIN_QUEUE": queue})
    app = workers.app(redis_url)
    name = workers.names[proc.pid]
    replies = app.control.cancel_consumer(queue, destination=[name], reply=True, timeout=10)
    assert replies, "the worker did not answer cancel_consumer"
    collector = ItrainCollector(redis_client, [queue])
    # When a message without the enqueue-time header (another language's) waits on it
    task_id = new_task_id()
    message = _without_enqueue_time(
        encode_envelope(TASK_TRAIN_STEP, task_id, [raw_event(model, "om-foreign")], queue)
    )
    redis_client.lpush(queue, message)
    pushed = time.time()
    # Then the worker notes when it first saw it at the head (within its look interval)
    noted = wait_until(lambda: redis_client.hget(QUEUE_HEADS, queue), 10, "a first sighting")
    sha, _, when = noted.decode().partition(" ")
    assert sha == hashlib.sha1(message).hexdigest()
    assert pushed - 0.1 <= float(when) <= time.time()
    # And its age counts from that sighting, growing while it waits
    time.sleep(1.5)
    age = _age(scrape(collector), queue)
    assert age >= 1.4
    assert age <= time.time() - float(when) + 0.05
    # When the worker takes from the queue again, the message trains and the queue's age drops
    app.control.add_consumer(queue, destination=[name], reply=True, timeout=10)
    wait_until(lambda: redis_client.get(f"celery-task-meta-{task_id}"), 60, "the foreign message's result")
    assert model_state(redis_client, model)["step"] == 1
    assert _age(scrape(collector), queue) == 0
    wait_until(lambda: redis_client.hget(QUEUE_HEADS, queue) is None, 10, "the note to be dropped")


def test_dead_letters_are_counted_by_error_type(
    redis_url, redis_client, make_model, make_client, start_workers, workers
) -> None:
    # Given a worker, and an exporter scrape before anything failed
    queue = _queue()
    model = make_model()
    start_workers(1, env={"ITRAIN_QUEUE": queue})
    client = make_client(redis_url, queue=queue)
    collector = ItrainCollector(redis_client, [queue])
    before = scrape(collector)
    unrouted = (("error", "InvalidEventError"), ("model", "_unrouted"))
    unrouted_before = before[("itrain_dead_lettered_total", unrouted)]
    assert before[("itrain_dead_lettered_total", (("error", "TargetError"), ("model", model)))] == 0
    # When three events have no target (an action without one), two events of a batch are
    # invalid, one invalid event names no initialised model, and the rest train
    good = make_events(model, 10, tag="om-good")
    no_target = [raw_event(model, f"om-nt{i}", action_type="no-such-action") for i in range(3)]
    handles = client.train_many(good + no_target)
    invalid = [raw_event(model, f"om-bad{i}", user_id="") for i in range(2)]
    stray = raw_event(f"no-model-{uuid.uuid4().hex[:6]}", "om-stray", user_id="")
    ids = [new_task_id() for _ in range(4)]
    batch = [ids, [*invalid, stray, raw_event(model, "om-fine")]]
    redis_client.lpush(queue, encode_envelope(TASK_TRAIN_BATCH, new_task_id(), batch, queue))
    wait_results(client, handles, 120, workers)
    wait_until(lambda: redis_client.get(f"celery-task-meta-{ids[-1]}"), 60, "the batch's results")
    after = scrape(collector)

    # Then the dead letters are counted by type, per model, as many as the lists hold
    def count(error: str, who: str = model) -> float:
        return after[("itrain_dead_lettered_total", (("error", error), ("model", who)))]

    assert count("TargetError") == 3
    assert count("InvalidEventError") == 2
    assert count("InvalidEventError", "_unrouted") == unrouted_before + 1
    assert count("LockTimeoutError") == 0  # the other known types are there, at 0
    assert redis_client.llen(ModelKeys(model).dead) == 5
    assert model_state(redis_client, model)["step"] == 11


def test_a_guard_trip_counts_its_refused_events_by_type(
    redis_client: redis.Redis, store: Store, make_model
) -> None:
    # Given a model's store (in process, on the real Redis) and the dead letters of a trip
    model = make_model()
    ckpt = store.load(model)
    assert ckpt is not None
    error = GuardTrippedError("tripped")
    dead = [dead_letter_entry(f"t{i}", error, model=model, event_id=f"e{i}") for i in range(4)]
    # When the guard trips (its snapshot is gone: it still pauses and writes the dead letters)
    done = store.restore(model, 999, trip=True, expected=ckpt.tag, dead=dead)
    # Then its refused events are counted under their type with their dead letters
    assert done.ok
    assert redis_client.hget(ModelKeys(model).dead_errors, "GuardTrippedError") == b"4"
    assert redis_client.llen(ModelKeys(model).dead) == 4


def test_heads_are_noted_once_and_only_without_an_enqueue_time(redis_client: redis.Redis) -> None:
    # Given two queues: one whose head carries its enqueue time, one whose head does not
    stamped, foreign = _queue(), _queue()
    heads = QueueHeads(redis_client, [stamped, foreign])
    assert heads.look() == 0  # both empty: nothing to note
    redis_client.lpush(stamped, encode_envelope(TASK_TRAIN_STEP, new_task_id(), [{}], stamped))
    message = _without_enqueue_time(encode_envelope(TASK_TRAIN_STEP, new_task_id(), [{}], foreign))
    redis_client.lpush(foreign, message)
    # When the heads are looked at twice
    first = heads.look()
    noted = redis_client.hget(QUEUE_HEADS, foreign)
    second = heads.look()
    # Then only the unstamped head is noted, once: a second look keeps the first sighting
    assert (first, second) == (1, 0)
    assert redis_client.hget(QUEUE_HEADS, stamped) is None
    assert redis_client.hget(QUEUE_HEADS, foreign) == noted
    # When it is taken and the queue is empty, its note goes
    redis_client.rpop(foreign)
    heads.look()
    assert redis_client.hget(QUEUE_HEADS, foreign) is None


def test_without_a_workers_sighting_the_exporter_counts_from_its_own(redis_client: redis.Redis) -> None:
    # Given an unstamped message on a queue no worker looks at
    queue = _queue()
    message = encode_envelope(TASK_TRAIN_STEP, new_task_id(), [{}], queue)
    redis_client.lpush(queue, _without_enqueue_time(message))
    collector = ItrainCollector(redis_client, [queue])
    # When the exporter scrapes, then again later
    first = _age(scrape(collector), queue)
    time.sleep(1.2)
    second = _age(scrape(collector), queue)
    # Then the age counts from its first scrape that saw the message
    assert first < 0.5
    assert second >= first + 1.1
