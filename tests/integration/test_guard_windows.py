"""The guard inside large batches, against a real Redis: every window of W consecutive events a
batch scores is checked, so a flipped stream sent in one ``train_many`` chunk trips the guard even
when the batch's last W events look clean; and a clean stream sent in large batches never trips
it, with a ratio checked against the stream's own noise.

Each batch is one chunk message, as ``train_many`` sends it, run by the pool-process code in this
process (``run_messages``), so each is one critical section whatever the machine's load.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import redis

from producer.client import TrainingClient
from producer.errors import GuardTrippedError
from producer.evaluation import decode_ring
from producer.keys import ModelKeys
from producer.stats import read_stats
from tests.helpers import statuses
from tests.integration.test_guard import labelled, outcome, send
from tests.integration.test_run_messages import app, own_runtime, step
from worker.devtools.synthetic import synthetic_events
from worker.engine.guard import Guard
from worker.store.guard import set_guard
from worker.store.snapshots import take_snapshot

__all__ = ["app", "own_runtime"]  # fixtures, imported for the tests below

# The guard: a window of 50 events, a ratio of 1.5.
WINDOW, RATIO = 50, 1.5


def weights(client: redis.Redis, model: str) -> bytes:
    return bytes(client.hget(ModelKeys(model).ckpt, "params"))


def snapshot_weights(client: redis.Redis, model: str, version: int) -> bytes:
    return bytes(client.hget(ModelKeys(model).snapshot_prefix + str(version), "params"))


# Exact mode learns the flipped labels within the batch, so its last W events look clean; a
# minibatch step scores the whole batch on the weights before it, so there a flipped burst hides
# behind clean events at the batch's end. Either way only a window inside the batch shows it.
STREAMS = {
    "per_event": lambda model: labelled(model, "bad-", 600, flipped=True),
    "minibatch": lambda model: labelled(model, "bad-", 300, flipped=True) + labelled(model, "tail-", 300),
}
# Exact SGD learns from a few batches; a minibatch step is one update per batch.
WARM_UP_BATCHES = {"per_event": 6, "minibatch": 150}


@pytest.mark.parametrize("mode", ["per_event", "minibatch"])
def test_flipped_stream_in_one_batch_trips_the_guard(
    mode: str, own_runtime: Any, make_model: Any, redis_client: redis.Redis, app: Any
) -> None:
    # Given a guarded model that learned clicks -> 1, skips -> 0, armed by a snapshot of it
    model = make_model(lr=0.5, mode=mode)
    set_guard(redis_client, model, Guard(WINDOW, RATIO), own_runtime.settings)
    for k in range(WARM_UP_BATCHES[mode]):
        send(labelled(model, f"good{k}-", 20))
    snap = take_snapshot(redis_client, model, keep=10)
    assert snap is not None
    assert read_stats(redis_client, model)["eval"]["guard"]["reference_version"] == snap
    step_before = step(redis_client, model)

    # When a stream with flipped labels arrives in one chunk (one critical section)
    ids = send(STREAMS[mode](model))

    # Then the whole batch is refused, the weights are the snapshot's and training is paused
    assert {outcome(app, i) for i in ids} == {"GuardTrippedError"}
    assert weights(redis_client, model) == snapshot_weights(redis_client, model, snap)
    assert step(redis_client, model) == step_before
    guard = read_stats(redis_client, model)["eval"]["guard"]
    assert (guard["paused"], guard["trips"]) == (True, 1)


def test_flipped_stream_from_train_many_trips_the_guard_in_a_running_worker(
    start_workers: Any, client: TrainingClient, make_model: Any, redis_client: redis.Redis, settings: Any
) -> None:
    # Given a worker process and a guarded model that learned clicks -> 1, skips -> 0, armed by a
    # snapshot of it
    start_workers(1)
    model = make_model(lr=0.5)
    set_guard(redis_client, model, Guard(WINDOW, RATIO), settings)
    warm = client.train_many(labelled(model, "good-", 200))
    assert statuses(client.wait_all(warm, timeout=120)) == {"trained": 200}
    snap = take_snapshot(redis_client, model, keep=10)
    assert snap is not None

    # When 600 events with flipped labels are sent in one train_many call (the case)
    results = client.wait_all(client.train_many(labelled(model, "bad-", 600, flipped=True)), timeout=120)

    # Then none of them trained: the batch that tripped the guard was refused, the rest met a
    # paused model; the weights are the snapshot's
    assert all(isinstance(r, GuardTrippedError) for r in results), statuses(results)
    assert weights(redis_client, model) == snapshot_weights(redis_client, model, snap)
    assert read_stats(redis_client, model)["eval"]["guard"]["trips"] == 1


def test_clean_stream_in_large_batches_never_trips_the_guard(
    own_runtime: Any, make_model: Any, redis_client: redis.Redis, app: Any
) -> None:
    # The worst of the many windows a large batch holds sits a few standard errors of a window's
    # mean above the stream's mean, so the guard here is one whose ratio leaves room for that on
    # this stream (checked below against the stream's measured noise): W = 200, R = 1.5.
    window, ratio = 200, 1.5
    model = make_model()
    set_guard(redis_client, model, Guard(window, ratio), own_runtime.settings)
    settings = own_runtime.settings
    assert (settings.snapshot_every, settings.eval_window) == (10_000, 1000)  # the defaults

    # Given a model trained on 10,000 synthetic events: the snapshot at step 10,000 arms its guard
    batch = 2000
    for k in range(5):
        send(synthetic_events(batch, model=model, seed=k))
    assert read_stats(redis_client, model)["eval"]["guard"]["reference_loss"] is not None

    # When 20,000 more arrive in batches of 2,000 (snapshots at 20,000 and 30,000 lower the reference)
    for k in range(5, 15):
        ids = send(synthetic_events(batch, model=model, seed=k))
        assert {outcome(app, ids[0]), outcome(app, ids[-1])} == {"trained"}

    # Then nothing tripped: every event trained
    stats = read_stats(redis_client, model)
    assert (stats["step"], stats["eval"]["guard"]["trips"], stats["eval"]["guard"]["paused"]) == (
        30_000,
        0,
        False,
    )
    # ... and the ratio is no looser than the stream's noise asks: its per-event log loss over the
    # last 1,000 events has a coefficient of variation cv, a window's mean varies by cv / sqrt(W),
    # and R - 1 leaves at least six of those (the worst of 20,000 windows reaches about four).
    keys = ModelKeys(model)
    ring = decode_ring(redis_client.get(keys.eval_ring), int(redis_client.hget(keys.ckpt, "eval_cap")))
    losses = np.array([r[0] for r in ring])
    cv = float(losses.std() / losses.mean())
    assert 0.5 < cv < 1.2, cv  # the stream is as noisy as measured when the test was written (0.84)
    assert ratio - 1 >= 6 * cv / math.sqrt(window)
