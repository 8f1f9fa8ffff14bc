"""A worker cut off from Redis in the middle of a batch, for longer than the lock's TTL and the
visibility timeout, then let back: issue 17's partition.

Two real workers train one model on a Redis of the test's own, each through a forwarder of the
dev tools (``worker.devtools.forwarder``): worker A, the one cut off, and worker B, the others.
``hold()`` stops passing bytes both ways and closes nothing (a dead link, not a reset), so A's
sockets stay open and what it sent or was sent waits; ``resume()`` lets it all go on, in order.
``ITRAIN_LOCK_TIMEOUT`` is 1 s and ``ITRAIN_VISIBILITY_TIMEOUT`` 2 s; A's socket timeout
(``ITRAIN_PUBLISH_TIMEOUT``) outlasts the partition, so its pending reply is still read when the
link returns, as over a link that drops packets for a while.

The cut lands mid-batch by a hook, not a sleep: the test watches Redis's ``MONITOR`` for A's pool
process taking the model's lock and then running the read of the checkpoint, and holds A's link
at that command. A then has a read of the checkpoint, a batch of 1,000 events to train on a slow
model (~0.3 s of SGD) and its commit still to send.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
import redis

from producer.keys import ModelKeys
from producer.settings import Settings
from tests.conftest import ClientFactory
from tests.helpers import (
    Workers,
    check_each_event_once,
    create_model,
    evidence_env,
    make_events,
    model_state,
    statuses,
    wait_results,
    wait_until,
)
from worker.devtools.embedded_redis import RedisServer
from worker.devtools.forwarder import Forwarder
from worker.lua import load_lua

pytestmark = pytest.mark.timeout(300)

LOCK_TIMEOUT = 1
VISIBILITY = 2
#: hidden=4096 costs ~0.3 ms per exact SGD step: the held batch trains for ~0.3 s after its read.
SLOW = {"hidden": 4096}
N_WARM, N_HELD, N_DURING, N_AFTER = 20, 1000, 40, 40
#: The read of the checkpoint under the lock (``worker/store/lua/read.lua``), as EVALSHA names it.
READ_SHA = hashlib.sha1(load_lua("worker.store", "read").encode()).hexdigest()


@pytest.fixture
def server() -> Iterator[RedisServer]:
    """A Redis of the test's own: its queue and unacknowledged records are the test's alone."""
    s = RedisServer().start()
    yield s
    s.close()


@pytest.fixture
def links(server: RedisServer) -> Iterator[tuple[Forwarder, Forwarder]]:
    """Worker A's link to Redis and worker B's."""
    with Forwarder(server.port) as a, Forwarder(server.port) as b:
        yield a, b


def _env(*, publish_timeout: float | None = None) -> dict[str, str]:
    env = {
        **evidence_env(VISIBILITY),
        "ITRAIN_LOCK_TIMEOUT": str(LOCK_TIMEOUT),
        "ITRAIN_LOG_EVERY": "1",  # a log line per step: the worker's log shows what it trained
    }
    if publish_timeout is not None:
        env["ITRAIN_PUBLISH_TIMEOUT"] = str(publish_timeout)
    return env


def hold_after_read(server: RedisServer, link: Forwarder, lock_key: str, send: Callable[[], Any]) -> str:
    """Call ``send()``, then hold ``link`` as soon as the connection that takes ``lock_key`` runs
    the checkpoint read under it (``MONITOR`` shows each command as Redis runs it); the lock token
    that connection took. Only commands of the worker behind ``link`` may reach Redis meanwhile:
    the caller holds every other worker's link."""
    watcher = redis.Redis(port=server.port, socket_timeout=60)
    try:
        with watcher.monitor() as monitor:
            send()
            holder, token = None, ""
            while True:
                seen = monitor.next_command()
                if seen["client_type"] != "tcp":
                    continue  # a command run by a script
                words = seen["command"].split(" ")
                who = (seen["client_address"], seen["client_port"])
                if holder is None and words[:2] == ["SET", lock_key] and "NX" in words:
                    holder, token = who, words[2]
                elif holder == who and words[:2] == ["EVALSHA", READ_SHA]:
                    link.hold()
                    return token
    finally:
        watcher.close()


def _ids(events: Sequence[dict[str, Any]]) -> list[str]:
    return [e["event_id"] for e in events]


def test_a_worker_cut_off_mid_batch_is_fenced_and_carries_on(
    server: RedisServer, links: tuple[Forwarder, Forwarder], workers: Workers, make_client: ClientFactory
) -> None:
    link_a, link_b = links
    r = redis.Redis(port=server.port, socket_timeout=10)
    model = create_model(r, Settings(redis_url=server.url), **SLOW)
    keys = ModelKeys(model)
    client = make_client(server.url, chunk_size=N_HELD)

    # Given worker A, warmed up on the model (its scripts loaded, its kernels compiled) ...
    (a,) = workers.start(1, redis_url=link_a.url, env=_env(publish_timeout=120), prefix="a")
    warm = make_events(model, N_WARM, "warm")
    handles = client.train_many(warm)
    wait_results(client, handles, 120, workers)
    # ... and worker B, kept off the queue while A takes the next batch
    (b,) = workers.start(1, redis_url=link_b.url, env=_env(), prefix="b")
    link_b.hold()

    # When A's link stops passing bytes right after A read the checkpoint under the lock, with a
    # batch of 1,000 events (one message) to train and commit
    held = make_events(model, N_HELD, "held")
    h_held: list[Any] = []
    token = hold_after_read(server, link_a, keys.lock, lambda: h_held.extend(client.train_many(held)))
    cut_at = time.monotonic()
    link_b.resume()
    # (the cut did land before A's commit: nothing of the batch is in the weights)
    assert model_state(r, model)["step"] == N_WARM, "A committed before its link was cut"
    ((tag, taken),) = r.zrange("unacked_index", 0, -1, withscores=True)

    # Then the lock A holds expires and B goes on training: events sent now, and, once the
    # visibility timeout has passed, A's batch, swept back and taken again by B
    during = make_events(model, N_DURING, "during")
    h_during = [client.train_step(e) for e in during]
    wait_until(lambda: r.get(keys.lock) != token.encode(), LOCK_TIMEOUT + 5, "A's lock to expire")
    results = wait_results(client, h_during + h_held, 120, workers)
    assert statuses(results) == {"trained": N_DURING + N_HELD}, statuses(results)
    partitioned = time.monotonic() - cut_at
    assert partitioned > max(LOCK_TIMEOUT, VISIBILITY)
    assert model_state(r, model)["step"] == N_WARM + N_DURING + N_HELD
    # (A's batch was redelivered under its own delivery tag, and B acked that delivery)
    wait_until(lambda: r.zcard("unacked_index") == 0, 30, "B's acks")

    # When A's link comes back (B kept off the queue, so that only A can take what is sent next)
    link_b.hold()
    link_a.resume()
    # Then A's commit of the stale batch is refused by the fence, its events are already in the
    # weights, and their results stay those B wrote
    wait_until(lambda: "commit refused" in workers.log(a), 60, "A's commit to be refused by the fence")
    # And A carries on: it trains new events
    after = make_events(model, N_AFTER, "after")
    h_after = [client.train_step(e) for e in after]
    after_results = wait_results(client, h_after, 120, workers)
    assert statuses(after_results) == {"trained": N_AFTER}
    link_b.resume()

    # And every event is in the weights exactly once: distinct steps 1..N, the model's step N
    everything = warm + held + during + after
    total = len(everything)
    evidence = check_each_event_once(r, model, _ids(everything))
    assert evidence["marked"] == total
    assert evidence["step"] == total
    answered = wait_results(client, handles + h_held + h_during + h_after, 60, workers)
    steps = sorted(res["step"] for res in answered)
    assert steps == list(range(1, total + 1)), "a step was answered twice, or an event not at all"
    # And nothing is left behind: the queue is empty and no delivery is still recorded
    wait_until(lambda: r.zcard("unacked_index") == 0 and r.hlen("unacked") == 0, 30, "every ack")
    assert r.llen(client.settings.queue) == 0
    workers.assert_alive([a, b])
    print(
        f"\npartition: cut after A's read, held {partitioned:.1f} s (lock {LOCK_TIMEOUT} s, "
        f"visibility {VISIBILITY} s); batch tag {tag!r} taken at {taken:.3f}; step {evidence['step']}"
    )
