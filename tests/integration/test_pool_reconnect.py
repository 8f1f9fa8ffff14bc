"""Pool jobs that Celery's prefork pool drops when the consumer reconnects (``AsynPool.flush``
discards every job no pool process has acknowledged yet) do not keep the pool counted busy
(``worker.consume.turns.dropped``). A real worker on a Redis of its own: its one pool process is
stopped (SIGSTOP) while it is handed two jobs, the worker's connections are killed, then the
process resumes; events sent afterwards must train (they waited for good before: issue 16's
stuck worker after ``itrain failover``)."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
import redis

from producer.client import TrainingClient
from producer.redis_conn import connect
from producer.settings import Settings
from tests.helpers import Workers, create_model, make_event, statuses, wait_results, wait_until
from worker.devtools.embedded_redis import RedisServer

pytestmark = pytest.mark.timeout(300)


def test_jobs_dropped_at_a_reconnect_leave_the_pool_free(tmp_path: Path, workers: Workers) -> None:
    with RedisServer() as server:
        # Given a worker with one pool process that has trained an event
        settings = Settings(redis_url=server.url)
        model = create_model(connect(settings.store, 5), settings)
        (proc,) = workers.start(1, redis_url=server.url, concurrency=1)
        (pool_pid,) = workers.pool(proc)
        client = TrainingClient(server.url)
        admin = redis.Redis.from_url(server.url)
        try:
            assert client.train_step(make_event(model, 0, "warm")).get(timeout=60)["status"] == "trained"
            # And two jobs handed to that process while it is stopped (never acknowledged)
            os.kill(pool_pid, signal.SIGSTOP)
            try:
                held = []
                for i in (1, 2):  # two micro-batches, apart: two pool jobs
                    held.append(client.train_step(make_event(model, i, "held")))
                    wait_until(lambda: admin.hlen("unacked") >= len(held), 30, "the worker to take it")
                    time.sleep(0.3)
                # When the worker's connections are killed: its consumer reconnects (the pool
                # drops both jobs)
                admin.client_kill_filter(_type="normal", skipme=True)
                wait_until(lambda: workers.log(proc).count("Connected to") >= 2, 60, "the reconnect")
            finally:
                os.kill(pool_pid, signal.SIGCONT)
            # Then events sent after it train, and the held ones are answered too
            after = [client.train_step(make_event(model, i, "after")) for i in range(3, 8)]
            results = wait_results(client, held + after, 60, workers)
            assert statuses(results[len(held) :]) == {"trained": len(after)}
            assert set(statuses(results[: len(held)])) <= {"trained", "duplicate"}
            # And the worker said why the pool was free again; its pool process is the same
            assert "dropped by the pool at a broker reconnect" in workers.log(proc)
            assert workers.pool(proc) == [pool_pid]
        finally:
            client.close()
            admin.close()
