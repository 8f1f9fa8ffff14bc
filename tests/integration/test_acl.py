"""Least-privilege Redis users (``itrain acl``): every path of each role runs as that role's user
and Redis's ``ACL LOG`` stays empty; the producer, the reader and the monitor cannot write a
model's weights; a missing right is reported as such, not as an outage."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from prometheus_client import generate_latest
from prometheus_client.registry import CollectorRegistry

from producer.client import TrainingClient
from producer.errors import PermissionDeniedError, ReplicationError
from producer.keys import ModelKeys
from producer.model_reader import ModelReader
from producer.settings import Settings
from tests.helpers import make_event
from worker.devtools.embedded_redis import RedisServer
from worker.devtools.stack import start_worker, stop_process, wait_for_workers
from worker.ops.acl import ROLES, acl_lines, unknown_commands
from worker.ops.exporter import ItrainCollector
from worker.store.replicas import ReplicaBarrier

QUEUE = "itrain"
MODEL = "acl-model"


class Acl:
    def __init__(self, server: RedisServer) -> None:
        self.server = server
        self.admin = redis.Redis.from_url(server.url)
        unknown = unknown_commands(self.admin)
        self.urls: dict[str, str] = {}
        # (The sentinel role is for sentinels: tests/integration/test_sentinel.py.)
        for role in (r for r in ROLES if r != "sentinel"):
            _, line = acl_lines(role, f"itrain-{role}", QUEUE, password=f"pw-{role}", unknown=unknown)
            self.admin.execute_command(*line.split())
            self.urls[role] = server.url.replace("redis://", f"redis://itrain-{role}:pw-{role}@")

    def denials(self) -> list[str]:
        """What ACL LOG recorded since the last call (and clears it)."""
        entries = [f"{e['username']}: {e['reason']} {e['object']}" for e in self.admin.acl_log()]
        self.admin.acl_log_reset()
        return entries


@pytest.fixture(scope="module")
def acl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Acl]:
    """A Redis of its own with one user per role, a model made by the worker user (``itrain
    init``), and one worker process running as the worker user."""
    with RedisServer() as server:
        setup = Acl(server)
        logs = tmp_path_factory.mktemp("acl")
        env = {"ITRAIN_REDIS_URL": setup.urls["worker"], "ITRAIN_QUEUE": QUEUE}
        init = subprocess.run(
            [str(Path(sys.executable).parent / "itrain"), "init", "--model", MODEL],
            env={**_environ(), **env},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert init.returncode == 0, init.stderr
        worker = start_worker(f"acl-{uuid.uuid4().hex[:4]}", env, concurrency=1, log=logs / "worker.log")
        try:
            with TrainingClient(server.url) as admin_client:  # (the admin pings the worker)
                wait_for_workers(admin_client.app, 1, procs=[worker], timeout=120)
            setup.denials()
            yield setup
        finally:
            stop_process(worker)
            # The worker's own paths (transport, training, results, task events, shutdown)
            # ran as the worker user through the whole module.
            assert setup.denials() == [], (logs / "worker.log").read_text()[-3000:]


def _environ() -> dict[str, str]:
    return dict(os.environ)


def test_producer_paths_need_nothing_more(acl: Acl) -> None:
    with TrainingClient(acl.urls["producer"]) as client:
        one = client.train_step(make_event(MODEL, 0, "acl-p"))
        assert one.get(timeout=60)["status"] == "trained"
        many = client.train_many([make_event(MODEL, i, "acl-pm") for i in range(20)])
        assert many[7].get(timeout=60)["status"] == "trained"
        assert {r["status"] for r in client.wait_all(many, timeout=60)} == {"trained"}
        client.train_step(make_event(MODEL, 1, "acl-pf"), result=False)
        assert client.queue_length() >= 0
        assert client.predict(make_event(MODEL, 2, "acl-pp")).get(timeout=60)["model"] == MODEL
    assert acl.denials() == []


def test_producer_and_worker_may_wait_for_replicas(acl: Acl) -> None:
    # Given clients that want a replica (this Redis has none, so each wait falls short)
    wanted = {"min_replicas": 1, "replica_timeout_ms": 10}
    # Then the producer's push and WAIT are allowed: too few replicas, not a missing right
    with (
        TrainingClient(settings=Settings(redis_url=acl.urls["producer"], **wanted)) as client,
        pytest.raises(ReplicationError),
    ):
        client.train_step(make_event(MODEL, 3, "acl-wait"))
    # And so is a worker's wait on a store that is not the broker's (a PUBLISH, then WAIT)
    worker = redis.Redis.from_url(acl.urls["worker"])
    s = Settings(redis_url=acl.server.url, store_url=acl.urls["worker"], **wanted)
    barrier = ReplicaBarrier.of(worker, s, s.store)
    assert barrier is not None
    with pytest.raises(ReplicationError):
        barrier.cross([], "commit")
    assert acl.denials() == []


def test_reader_paths_need_nothing_more(acl: Acl) -> None:
    with TrainingClient(acl.urls["reader"]) as client:
        assert client.stats(MODEL)["initialized"] is True
        handles = client.train_many([make_event(MODEL, i, "acl-r") for i in range(5)])
        assert {r["status"] for r in client.wait_all(handles, timeout=60)} == {"trained"}
    # and the in-process predictor
    with ModelReader(MODEL, acl.urls["reader"], refresh_ms=0) as reader:
        assert reader.predict(make_event(MODEL, 0, "acl-rp"))["model"] == MODEL
    assert acl.denials() == []


def test_monitor_scrapes_everything_it_serves(acl: Acl) -> None:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ItrainCollector(redis.Redis.from_url(acl.urls["monitor"]), [QUEUE]))
    page = generate_latest(registry).decode()
    assert "itrain_up 1.0" in page
    assert f'itrain_model_step{{model="{MODEL}"}}' in page
    assert acl.denials() == []


WRITES: list[tuple[Any, ...]] = [
    ("HSET", ModelKeys(MODEL).ckpt, "version", "999"),
    ("DEL", ModelKeys(MODEL).ckpt),
    ("EVAL", "return redis.call('HSET', KEYS[1], 'params', '')", "1", ModelKeys(MODEL).ckpt),
    ("LPUSH", ModelKeys(MODEL).history, "forged"),
    ("SET", "celery-task-meta-forged", "{}"),
]


@pytest.mark.parametrize("role", ["producer", "reader", "monitor"])
def test_only_the_worker_can_write_weights_or_results(acl: Acl, role: str) -> None:
    client = redis.Redis.from_url(acl.urls[role])
    before = acl.admin.hgetall(ModelKeys(MODEL).ckpt)
    for command in WRITES:
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.execute_command(*command)
    assert acl.admin.hgetall(ModelKeys(MODEL).ckpt) == before
    assert len(acl.denials()) == len(WRITES)


def test_missing_right_is_a_permission_error_not_an_outage(acl: Acl) -> None:
    # Given the monitor's user (it may not push to the queue) used to publish
    # Then publishing fails at once with an error that says it is a permission
    with (
        TrainingClient(acl.urls["monitor"]) as client,
        pytest.raises(PermissionDeniedError, match=r"lacks a permission.*itrain acl --role producer"),
    ):
        client.train_step(make_event(MODEL, 0, "acl-denied"))
    assert all(b"acl-denied" not in m for m in acl.admin.lrange(QUEUE, 0, -1))
    assert acl.denials() != []  # (Redis logged the refusal)
