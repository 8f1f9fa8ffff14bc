"""A failover behind one stable address (a managed service's DNS name; here a TCP forwarder of the
test's own): the old master is demoted to a replica while connections to it stay open, and answers
their writes with READONLY (blocked commands with -UNBLOCKED). Every component drops such a
connection and reconnects through the address, to the promoted server, by itself."""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import redis

from producer.async_client import AsyncTrainingClient
from producer.client import TrainingClient
from producer.redis_conn import connect
from producer.settings import Settings
from tests.forwarder import Forwarder
from tests.helpers import Workers, check_each_event_once, create_model, make_event, statuses, wait_until
from worker.devtools.embedded_redis import RedisServer, free_port

pytestmark = pytest.mark.timeout(300)


@dataclass
class Pair:
    """A master and its replica behind one forwarded address."""

    first: RedisServer
    second: RedisServer
    forwarder: Forwarder

    def client(self, server: RedisServer) -> redis.Redis:
        return redis.Redis(port=server.port, socket_timeout=5)

    def cut_off(self) -> None:
        """Promote the replica once it holds everything and send new connections to it; the old
        master is demoted to a replica of a server that is not there (cut off from the promoted
        one, as a retired or fenced node: it relays nothing the promoted server publishes)."""
        first, second = self.client(self.first), self.client(self.second)
        first.execute_command("CLIENT", "PAUSE", 5000, "WRITE")
        offset = first.info("replication")["master_repl_offset"]
        wait_until(
            lambda: second.info("replication").get("slave_repl_offset", -1) >= offset, 30, "the replica"
        )
        second.execute_command("REPLICAOF", "NO", "ONE")
        first.execute_command("REPLICAOF", "127.0.0.1", free_port())
        self.forwarder.switch(self.second.port)
        first.execute_command("CLIENT", "UNPAUSE")

    def fail_over(self) -> None:
        """Promote the replica once it holds everything, demote the master to its replica, and
        send new connections to the promoted one (connections already open stay where they are)."""
        first, second = self.client(self.first), self.client(self.second)

        def caught_up() -> bool:
            offset = first.info("replication")["master_repl_offset"]
            return bool(second.info("replication").get("slave_repl_offset", -1) >= offset)

        first.execute_command("CLIENT", "PAUSE", 5000, "WRITE")  # nothing new while it catches up
        wait_until(caught_up, 30, "the replica to catch up")
        second.execute_command("REPLICAOF", "NO", "ONE")
        first.execute_command("REPLICAOF", "127.0.0.1", self.second.port)
        first.execute_command("CLIENT", "UNPAUSE")
        self.forwarder.switch(self.second.port)
        wait_until(lambda: first.info("replication")["role"] == "slave", 30, "the old master to be a replica")


@pytest.fixture
def pair() -> Iterator[Pair]:
    with RedisServer() as first, RedisServer(extra=["--replicaof", "127.0.0.1", str(first.port)]) as second:
        forwarder = Forwarder(first.port)
        try:
            yield Pair(first, second, forwarder)
        finally:
            forwarder.close()


def test_both_clients_push_to_the_promoted_server(pair: Pair) -> None:
    # Given clients whose connections reach the master through the stable address
    url = pair.forwarder.url
    client = TrainingClient(url)
    try:
        client.train_many([make_event("m", i, "one") for i in range(3)])

        async def push_async(tag: str) -> None:
            async with AsyncTrainingClient(url) as aclient:
                await aclient.train_many([make_event("m", i, tag) for i in range(3)])
                if tag == "two":
                    pair.fail_over()
                    await aclient.train_many([make_event("m", i, "three") for i in range(3)])

        asyncio.run(push_async("two"))
        # When the master is demoted behind the address (the sync client's connection still open)
        # Then each client's next push reconnects and lands on the promoted server
        client.train_many([make_event("m", i, "four") for i in range(3)])
    finally:
        client.close()
    assert pair.client(pair.second).llen("itrain") == 4


def test_a_worker_consumes_from_the_promoted_server(pair: Pair, workers: Workers) -> None:
    # Given a worker and a client on the stable address, and events trained on the first master
    url = pair.forwarder.url
    settings = Settings(redis_url=url, history_max=10_000)
    model = create_model(connect(settings.store, 5), settings)
    (proc,) = workers.start(1, redis_url=url, env={"ITRAIN_HISTORY_MAX": "10000"})
    pool = set(workers.pool(proc))
    with TrainingClient(url) as client:
        before = [make_event(model, i, "before") for i in range(20)]
        assert statuses(client.wait_all(client.train_many(before), timeout=120)) == {"trained": 20}
        # When the master is demoted behind the address
        pair.fail_over()
        # Then the same worker and client carry on with the promoted server
        after = [make_event(model, i, "after") for i in range(20)]
        handles = client.train_many(after[:10]) + [client.train_step(e) for e in after[10:]]
        assert statuses(client.wait_all(handles, timeout=120)) == {"trained": 20}
    evidence = check_each_event_once(pair.client(pair.second), model, [e["event_id"] for e in before + after])
    assert evidence["step"] == 40
    workers.assert_alive([proc])
    assert set(workers.pool(proc)) == pool, "the worker's pool was restarted"


def test_a_get_subscribed_on_a_demoted_master_returns_the_result_written_on_the_promoted_one(
    pair: Pair, workers: Workers
) -> None:
    url = pair.forwarder.url
    settings = Settings(redis_url=url)
    model = create_model(connect(settings.store, 5), settings)
    (proc,) = workers.start(1, redis_url=url)
    with TrainingClient(url) as client:
        assert client.train_step(make_event(model, 0, "warm")).get(timeout=60)["status"] == "trained"
        # Given a job that waits (its worker stopped) and a get() subscribed to its result's
        # channel through the address, on the master
        workers.signal_group(proc, signal.SIGSTOP)
        handle = client.train_step(make_event(model, 1, "held"))
        outcome: dict[str, object] = {}

        def wait() -> None:
            try:
                outcome["result"] = handle.get(timeout=60)
            except Exception as exc:  # reported by the assertion below
                outcome["result"] = exc

        waiter = threading.Thread(target=wait, daemon=True)
        waiter.start()
        old = pair.client(pair.first)
        wait_until(
            lambda: any(c.get("sub") == "1" for c in old.client_list(_type="pubsub")), 30, "the subscription"
        )
        # When the master is demoted, cut off from the promoted server (it relays no publish),
        # and the worker then trains the job on the promoted server
        pair.cut_off()
        workers.signal_group(proc, signal.SIGCONT)
        waiter.join(90)
        # Then the waiting get() returns the result (within its timeout, not at it)
        result = outcome["result"]
        assert isinstance(result, dict), result
        assert (result["status"], result["event_id"]) == ("trained", "held-1")
        assert pair.client(pair.second).exists(f"celery-task-meta-{handle.id}")
    workers.assert_alive([proc])
