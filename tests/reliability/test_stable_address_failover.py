"""Failovers behind one stable address, as managed Redis services do them: a master and its
replica behind a TCP forwarder of the test's own (the service's DNS name), two real workers and
producer threads (``train_step`` and ``train_many``, ``ITRAIN_MIN_REPLICAS=1``) on a plain
``redis://`` URL of the forwarder.

Mid-stream, a managed-style failover: writes paused on the master (``CLIENT PAUSE 3000 WRITE``),
the replica caught up and promoted, the old master demoted to its replica (it answers READONLY),
the forwarder switched to the promoted server, writes unpaused. Twice in one run, back and forth:
first with the connections made before the switch left open to the demoted server (the hard case
``producer.demotion`` is for: nothing resets them, only the replies say the server changed), then
with the forwarder cutting them (a proxy that resets its connections on failover). After each:
every event whose call returned is trained exactly once (its done marker and its ``trained``
result name the same step, the steps are distinct, the model's step is the number of distinct
events), every handle resolves, and the workers carry on with the same processes.
"""

from __future__ import annotations

import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import redis

from producer.client import TrainingClient
from producer.redis_conn import connect
from producer.settings import Settings
from tests.forwarder import Forwarder
from tests.helpers import Workers, check_each_event_once, create_model, evidence_env, wait_until
from tests.reliability.test_failover import Producers
from worker.devtools.embedded_redis import RedisServer, ReplicaSet

pytestmark = pytest.mark.timeout(300)

#: Seconds a message taken from the old master and lost with it waits in ``unacked`` before it
#: comes back: short, so that a lost delivery does not hold the test for the default 300 s.
VISIBILITY = 10


def _client(server: RedisServer) -> redis.Redis:
    return redis.Redis(port=server.port, socket_timeout=5)


def _clients(client: redis.Redis) -> int:
    """The connections a server has from clients other than ``client`` itself (replicas apart)."""
    return len(client.client_list(_type="normal")) - 1


def _fail_over(forwarder: Forwarder, old: RedisServer, new: RedisServer, *, cut: bool) -> int:
    """A managed service's planned failover from ``old`` to its replica ``new``, behind the
    forwarder: writes paused on ``old`` so that ``new`` holds all of them when promoted. Returns
    how many client connections the demoted server still had once the forwarder switched."""
    o, n = _client(old), _client(new)
    try:
        o.execute_command("CLIENT", "PAUSE", 3000, "WRITE")

        def caught_up() -> bool:
            offset = o.info("replication")["master_repl_offset"]
            return bool(n.info("replication").get("slave_repl_offset", -1) >= offset)

        wait_until(caught_up, 2.5, "the replica to catch up within the pause")
        n.execute_command("REPLICAOF", "NO", "ONE")
        o.execute_command("REPLICAOF", "127.0.0.1", new.port)
        forwarder.switch(new.port, cut=cut)
        left = _clients(o)
        o.execute_command("CLIENT", "UNPAUSE")
        # the demoted server must be a replica in sync again before a push can meet MIN_REPLICAS=1
        wait_until(
            lambda: o.info("replication").get("master_link_status") == "up", 30, "the demoted master's link"
        )
        return left
    finally:
        o.close()
        n.close()


class Run:
    """The pair, the forwarder, the model, the workers and the tally of every event sent so far."""

    def __init__(self, forwarder: Forwarder, workers: Workers, procs: list[Any], model: str) -> None:
        self.forwarder = forwarder
        self.workers = workers
        self.procs = procs
        self.pools = {p.pid: set(workers.pool(p)) for p in procs}
        self.model = model
        self.sent: set[str] = set()

    def scenario(self, tag: str, old: RedisServer, new: RedisServer, *, cut: bool) -> None:
        with Producers(self.forwarder.url, self.model, tag, 1) as producers:
            wait_until(lambda: producers.count() >= 60, 120, f"{tag}: events accepted before the failover")
            left = _fail_over(self.forwarder, old, new, cut=cut)
            if not cut:
                # the hard case did happen: clients were still connected to the demoted server
                assert left > 0, "no connection was left on the demoted server"
            after = producers.count()
            # the stream goes on for a while (several worker batches) on the promoted server
            wait_until(
                lambda: producers.count() >= after + 200, 120, f"{tag}: events accepted after the failover"
            )
            producers.stop()
            assert not producers.unexpected, producers.unexpected
            producers.resend_refused()
            results = producers.client.wait_all(producers.handles, timeout=180)
        self.sent |= set(producers.accepted) | set(producers.refused)
        assert _client(new).info("replication")["role"] == "master"
        assert _client(old).info("replication")["role"] == "slave"
        # Then every handle resolved: `trained`, or `duplicate` for an event trained already
        # (a re-sent refused event, or a redelivery whose result the failover lost)
        counts = Counter(r["status"] if isinstance(r, dict) else "FAILURE" for r in results)
        assert set(counts) <= {"trained", "duplicate"}, (tag, counts, self.workers.tails())
        # And every event sent so far is in the weights exactly once, on the promoted server
        evidence = check_each_event_once(_client(new), self.model, sorted(self.sent))
        assert evidence["marked"] == len(self.sent), (tag, evidence["marked"], len(self.sent))
        assert evidence["step"] == len(self.sent), (tag, evidence["step"], len(self.sent))
        # And each `trained` result names its marker's step, no step twice
        trained = [r for r in results if isinstance(r, dict) and r["status"] == "trained"]
        steps = [r["step"] for r in trained]
        assert len(set(steps)) == len(steps), f"{tag}: a step was answered twice"
        wrong = [
            (r["event_id"], r["step"]) for r in trained if evidence["markers"][r["event_id"]] != r["step"]
        ]
        assert not wrong, f"{tag}: results whose step is not their marker's: {wrong[:5]}"
        assert set(producers.accepted) <= {r["event_id"] for r in results if isinstance(r, dict)}
        # And the workers carried on with the same processes
        self.workers.assert_alive(self.procs)
        for proc in self.procs:
            assert set(self.workers.pool(proc)) == self.pools[proc.pid], (
                f"{tag}: a worker's pool was restarted"
            )
        # (the tally, for the report: `pytest -s` shows it)
        print(
            f"{tag}: {left} connections left on the demoted server; "
            f"{len(producers.accepted)} accepted, {dict(producers.errors)} raised "
            f"({len(producers.refused)} events re-sent), results {dict(counts)}, step {evidence['step']}"
        )


def test_every_accepted_event_trains_once_across_failovers_behind_one_address(
    tmp_path: Path, workers: Workers
) -> None:
    with ReplicaSet(replicas=1) as pair:
        first, second = pair.master, pair.replicas[0]
        forwarder = Forwarder(first.port)
        try:
            # Given two workers and producers on the forwarder's plain URL
            url = forwarder.url
            settings = Settings(redis_url=url, history_max=100_000)
            model = create_model(connect(settings.store, 5), settings)
            procs = workers.start(2, redis_url=url, env=evidence_env(VISIBILITY))
            run = Run(forwarder, workers, procs, model)
            started = time.monotonic()

            # When the master is demoted and the forwarder switched, old connections left open
            run.scenario("kept", first, second, cut=False)

            # When it fails back, the forwarder cutting the connections made before the switch
            run.scenario("cut", second, first, cut=True)
            print(f"both failovers in {time.monotonic() - started:.0f} s")
        finally:
            forwarder.close()


def _subscribers(server: RedisServer) -> int:
    """The pattern subscriptions on ``server`` (a worker's control channel is one)."""
    return sum(int(c.get("psub", 0)) for c in _client(server).client_list(_type="pubsub"))


def test_a_control_broadcast_after_a_failover_behind_one_address_reaches_the_promoted_server(
    workers: Workers,
) -> None:
    with ReplicaSet(replicas=1) as pair:
        old, new = pair.master, pair.replicas[0]
        forwarder = Forwarder(old.port)
        try:
            (proc,) = workers.start(1, redis_url=forwarder.url)
            name = workers.names[proc.pid]
            # Given a client that broadcast through the address (kombu's pooled connections, kept
            # process-wide, left open on the master) and a worker that answered it
            with TrainingClient(forwarder.url) as first:
                assert set().union(*first.app.control.ping(timeout=2)) == {name}
                # When the master is demoted behind the address, its connections left open
                _fail_over(forwarder, old, new, cut=False)
                # (the worker subscribes again on the promoted server by itself: a broadcast is
                # heard only by those subscribed when it is sent, as in any pub/sub)
                wait_until(
                    lambda: (_subscribers(old), _subscribers(new)) == (0, 1),
                    30,
                    "the worker's control channel on the promoted server only",
                )
                # Then a broadcast, from a new client (the same pooled connections) or the first,
                # raises nothing and reaches the worker, which lived through the demotion
                with TrainingClient(forwarder.url) as fresh:
                    assert set().union(*fresh.app.control.ping(timeout=2)) == {name}
                assert set().union(*first.app.control.ping(timeout=2)) == {name}
            workers.assert_alive([proc])
        finally:
            forwarder.close()
