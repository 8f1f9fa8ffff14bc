"""Workers cut off from Redis in the middle of a batch, for longer than the lock's TTL and the
visibility timeout, then let back (issue 17's partition).

Two real workers train one slow model on a Redis of the test's own, each through its own
forwarder of the dev tools (``worker.devtools.forwarder``). ``hold()`` stops passing bytes both
ways and closes nothing (a dead link, not a reset): what a worker sent or was sent waits, and
``resume()`` lets it all go on, in order. ``ITRAIN_LOCK_TIMEOUT`` is 1 s and
``ITRAIN_VISIBILITY_TIMEOUT`` 2 s; the socket timeout of a worker that is cut
(``ITRAIN_PUBLISH_TIMEOUT``) outlasts its partition, so its pending reply is still read when the
link returns, as over a link that drops packets for a while.

The cut lands mid-batch by a hook, not a sleep: the test watches Redis's ``MONITOR`` for the
worker's pool process taking the model's lock and then running the read of the checkpoint under
it, and holds that worker's link at that command. The worker then has its read, a batch of 2,000
events (one message) to train on a slow model (~0.6 s of SGD) and its commit still to send.

* ``test_a_worker_cut_off_mid_batch_is_fenced_and_carries_on``: worker A is cut; B trains new
  events and A's batch, swept back after the visibility timeout; A's stale commit is refused by
  the fence when its link returns; A then trains new events.
* ``test_a_late_ack_after_a_partition_leaves_the_new_holders_record``: A is cut, B takes A's
  batch again and is cut in turn; A's commit lands and A acks late, under the delivery tag that B's
  delivery holds; B's record stands; B's commit is refused, B acks its own delivery.

Both end with every event in the weights exactly once and nothing queued or recorded.
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
#: hidden=4096 costs ~0.3 ms per exact SGD step: the held batch trains for ~0.6 s after its read.
SLOW = {"hidden": 4096}
N_WARM, N_HELD, N_DURING, N_AFTER = 20, 2000, 40, 40
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


def _env(*, publish_timeout: float | None = None, visibility: int = VISIBILITY) -> dict[str, str]:
    env = {
        **evidence_env(visibility),
        "ITRAIN_LOCK_TIMEOUT": str(LOCK_TIMEOUT),
        "ITRAIN_LOG_EVERY": "1",  # a log line per step: the worker's log shows what it trained
    }
    if publish_timeout is not None:
        env["ITRAIN_PUBLISH_TIMEOUT"] = str(publish_timeout)
    return env


#: One command as ``MONITOR`` shows it: (client address, client port), the command's words.
Seen = tuple[tuple[str, str], list[str]]


def watch(server: RedisServer, send: Callable[[], Any], until: Callable[[Seen], Any]) -> Any:
    """Call ``send()``, then read each command Redis runs (``MONITOR``) until ``until`` returns
    something for one of them; that value. Commands run by scripts are skipped."""
    watcher = redis.Redis(port=server.port, socket_timeout=60)
    try:
        with watcher.monitor() as monitor:
            send()
            while True:
                seen = monitor.next_command()
                if seen["client_type"] != "tcp":
                    continue
                found = until(((seen["client_address"], seen["client_port"]), seen["command"].split(" ")))
                if found is not None:
                    return found
    finally:
        watcher.close()


def hold_after_read(server: RedisServer, link: Forwarder, lock_key: str, send: Callable[[], Any]) -> str:
    """Call ``send()``, then hold ``link`` as soon as the connection that takes ``lock_key`` runs
    the checkpoint read under it; the lock token that connection took. Only the worker behind
    ``link`` may take the lock meanwhile: the caller holds every other worker's link."""
    holder: list[Any] = []

    def at_read(seen: Seen) -> str | None:
        who, words = seen
        if not holder and words[:2] == ["SET", lock_key] and "NX" in words:
            holder[:] = [who, words[2]]
        elif holder and holder[0] == who and words[:2] == ["EVALSHA", READ_SHA]:
            link.hold()
            return str(holder[1])
        return None

    return str(watch(server, send, at_read))


def _ids(events: Sequence[dict[str, Any]]) -> list[str]:
    return [e["event_id"] for e in events]


class Run:
    """A slow model, a client sending straight to Redis, and workers A and B, each behind its own
    link. A is warmed up on the model (scripts loaded, kernels compiled, ``N_WARM`` events
    trained) before B starts; B's link is then held, so that A alone takes the next message."""

    def __init__(
        self,
        server: RedisServer,
        links: tuple[Forwarder, Forwarder],
        workers: Workers,
        make_client: ClientFactory,
        envs: tuple[dict[str, str], dict[str, str]],
    ) -> None:
        self.link_a, self.link_b = links
        self.workers = workers
        self.r = redis.Redis(port=server.port, socket_timeout=10)
        self.model = create_model(self.r, Settings(redis_url=server.url), **SLOW)
        self.keys = ModelKeys(self.model)
        self.client = make_client(server.url, chunk_size=N_HELD)
        (self.a,) = workers.start(1, redis_url=self.link_a.url, env=envs[0], prefix="a")
        self.events = make_events(self.model, N_WARM, "warm")
        self.handles = self.client.train_many(self.events)
        wait_results(self.client, self.handles, 120, workers)
        (self.b,) = workers.start(1, redis_url=self.link_b.url, env=envs[1], prefix="b")
        self.link_b.hold()

    def send(self, events: list[dict[str, Any]], *, one_message: bool = False) -> list[Any]:
        """``events`` as one ``train_many`` message, or one ``train_step`` message each."""
        if one_message:
            handles = list(self.client.train_many(events))
        else:
            handles = [self.client.train_step(e) for e in events]
        self.events += events
        self.handles += handles
        return handles

    def step(self) -> int:
        return model_state(self.r, self.model)["step"]

    def unacked(self) -> list[tuple[bytes, float]]:
        """Every delivery recorded as unacknowledged: its tag, when it was taken."""
        return [(tag, float(score)) for tag, score in self.r.zrange("unacked_index", 0, -1, withscores=True)]

    def check_every_event_once(self) -> int:
        """Every event sent in the weights once (distinct steps 1..N, the model's step N), each
        handle answered with its event's step, nothing left queued or recorded; N."""
        total = len(self.events)
        evidence = check_each_event_once(self.r, self.model, _ids(self.events))
        assert evidence["marked"] == total
        assert evidence["step"] == total
        answered = wait_results(self.client, self.handles, 60, self.workers)
        steps = sorted(res["step"] for res in answered)
        assert steps == list(range(1, total + 1)), "a step was answered twice, or an event not at all"
        for res in answered:
            assert evidence["markers"][res["event_id"]] == res["step"], res
        wait_until(lambda: not self.unacked() and self.r.hlen("unacked") == 0, 30, "every ack")
        assert self.r.llen(self.client.settings.queue) == 0
        self.workers.assert_alive([self.a, self.b])
        return total


def test_a_worker_cut_off_mid_batch_is_fenced_and_carries_on(
    server: RedisServer, links: tuple[Forwarder, Forwarder], workers: Workers, make_client: ClientFactory
) -> None:
    # Given worker A, warmed up on the model, and worker B, kept off the queue for a moment
    run = Run(server, links, workers, make_client, (_env(publish_timeout=120), _env()))
    r, keys = run.r, run.keys

    # When A's link stops passing bytes right after A read the checkpoint under the lock, with a
    # batch of 2,000 events (one message) to train and commit
    held = make_events(run.model, N_HELD, "held")
    h_held: list[Any] = []
    token = hold_after_read(
        server, run.link_a, keys.lock, lambda: h_held.extend(run.send(held, one_message=True))
    )
    cut_at = time.monotonic()
    run.link_b.resume()
    # (the cut did land before A's commit: nothing of the batch is in the weights)
    assert run.step() == N_WARM, "A committed before its link was cut"
    ((tag, taken),) = run.unacked()

    # Then the lock A holds expires and B goes on training: events sent now, and, once the
    # visibility timeout has passed, A's batch, swept back and taken again by B
    h_during = run.send(make_events(run.model, N_DURING, "during"))
    wait_until(lambda: r.get(keys.lock) != token.encode(), LOCK_TIMEOUT + 5, "A's lock to expire")
    results = wait_results(run.client, h_during + h_held, 120, workers)
    assert statuses(results) == {"trained": N_DURING + N_HELD}, statuses(results)
    partitioned = time.monotonic() - cut_at
    assert partitioned > max(LOCK_TIMEOUT, VISIBILITY)
    assert run.step() == N_WARM + N_DURING + N_HELD
    wait_until(lambda: not run.unacked(), 30, "B's acks")

    # When A's link comes back (B kept off the queue, so that only A can take what is sent next)
    run.link_b.hold()
    run.link_a.resume()
    # Then A's commit of the stale batch is refused by the fence (its events are in the weights
    # already, and their results stay those B wrote)
    wait_until(lambda: "commit refused" in workers.log(run.a), 60, "A's commit to be refused by the fence")
    # And A carries on: it trains new events
    h_after = run.send(make_events(run.model, N_AFTER, "after"))
    assert statuses(wait_results(run.client, h_after, 120, workers)) == {"trained": N_AFTER}
    run.link_b.resume()

    # And every event is in the weights exactly once, and nothing is left behind
    total = run.check_every_event_once()
    print(
        f"\npartition: cut after A's read, held {partitioned:.1f} s (lock {LOCK_TIMEOUT} s, "
        f"visibility {VISIBILITY} s); batch {tag!r} first taken at {taken:.3f}; step {total}"
    )


def test_a_late_ack_after_a_partition_leaves_the_new_holders_record(
    server: RedisServer, links: tuple[Forwarder, Forwarder], workers: Workers, make_client: ClientFactory
) -> None:
    # Given workers A and B, both with sockets that outlast a partition; A's own visibility
    # timeout is long, so that what becomes of B's record is A's ack's doing alone (A sweeping a
    # record of B's older than its timeout would be right too, and is not what is tested here)
    envs = (_env(publish_timeout=120, visibility=60), _env(publish_timeout=120))
    run = Run(server, links, workers, make_client, envs)
    r, keys = run.r, run.keys
    # ... A cut off right after its read under the lock, holding a batch of 2,000 events
    held = make_events(run.model, N_HELD, "held")
    h_held: list[Any] = []
    hold_after_read(server, run.link_a, keys.lock, lambda: h_held.extend(run.send(held, one_message=True)))
    ((tag, first_take),) = run.unacked()
    # ... and B, once A's lock expired and the visibility timeout passed, taking the same message
    # again (same delivery tag, a newer take) and cut off in turn right after its own read
    hold_after_read(server, run.link_b, keys.lock, run.link_b.resume)
    ((again, second_take),) = run.unacked()
    assert again == tag, "the redelivered message has another delivery tag"
    assert second_take > first_take + VISIBILITY
    assert run.step() == N_WARM, "B committed before its link was cut"

    # When A's link comes back: nobody committed meanwhile, so A's commit lands, and A acks the
    # message late, under the tag B's delivery holds now
    def acked_by_a(seen: Seen) -> bool | None:
        # the ack script, or the removals of an ack that checks nothing
        words = seen[1]
        return True if words[0] in ("EVALSHA", "ZREM", "HDEL") and tag.decode() in words else None

    watch(server, run.link_a.resume, acked_by_a)
    # Then B's record of the message stands: its take, its text, its delivery count
    assert run.unacked() == [(tag, second_take)], "A's late ack removed B's record of the message"
    assert r.hexists("unacked", tag)
    assert int(r.hget("unacked_deliveries", tag) or 0) == 2
    assert statuses(wait_results(run.client, h_held, 60, workers)) == {"trained": N_HELD}

    # When B's link comes back: its commit is refused by the fence, and it acks its own delivery
    run.link_b.resume()
    wait_until(lambda: "commit refused" in workers.log(run.b), 60, "B's commit to be refused by the fence")
    wait_until(lambda: not run.unacked(), 30, "B's ack")
    # And both workers carry on: each trains new events alone
    for name, other in (("a", run.link_b), ("b", run.link_a)):
        other.hold()
        h_new = run.send(make_events(run.model, N_AFTER, f"after-{name}"))
        assert statuses(wait_results(run.client, h_new, 120, workers)) == {"trained": N_AFTER}
        other.resume()
    # And every event is in the weights exactly once, and nothing is left behind
    run.check_every_event_once()
