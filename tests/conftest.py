"""Shared fixtures: a private redis-server on a free port, real worker processes, a client.

Nothing here touches a Redis the tests did not start: the session sets ``ITRAIN_REDIS_URL`` to
its own server before anything reads settings, and every model name is unique per test, so the
workers' in-memory checkpoint caches never mix tests.
"""

from __future__ import annotations

import fcntl
import os
import tempfile
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from producer.client import TrainingClient
from producer.settings import Settings, get_settings
from tests.helpers import ClientFactory, Workers, create_model
from worker.devtools.embedded_redis import RedisServer
from worker.store.model_store import Store

ROOT = Path(__file__).resolve().parent.parent


#: The machine's own Redis (redis-py's default address). The tests never use it; a connection
#: that is sent on before it was pointed at a server of ours (a sentinel-managed connection made
#: outside its pool) falls back to this address, and ``machine_redis_untouched`` catches that.
MACHINE_REDIS = ("127.0.0.1", 6379)
#: The keys our workers and producers would write there: the queue and its records, the models.
OUR_KEYS = ("itrain", "unacked", "unacked_index", "itrain:models", "itrain:layout")


def _our_keys_on_the_machine_redis() -> dict[str, int] | None:
    """Each of ``OUR_KEYS`` with its length (0: absent), or None when nothing answers there."""
    host, port = MACHINE_REDIS
    client = redis.Redis(host=host, port=port, socket_timeout=1.0, socket_connect_timeout=1.0)
    try:
        return {key: int(client.exists(key)) and _length(client, key) for key in OUR_KEYS}
    except (redis.RedisError, OSError):
        return None
    finally:
        client.close()


def _length(client: redis.Redis, key: str) -> int:
    kind = client.type(key)
    if kind == b"list":
        return int(client.llen(key))
    if kind == b"hash":
        return int(client.hlen(key))
    if kind == b"zset":
        return int(client.zcard(key))
    return 1


@pytest.fixture(scope="session", autouse=True)
def machine_redis_untouched() -> Iterator[None]:
    """Fails the run when any test wrote our keys to the machine's own Redis."""
    before = _our_keys_on_the_machine_redis()
    yield
    after = _our_keys_on_the_machine_redis()
    if before is not None and after is not None and after != before:
        pytest.fail(
            f"a test wrote to the machine's Redis on {MACHINE_REDIS[0]}:{MACHINE_REDIS[1]}: "
            f"our keys went from {before} to {after}"
        )


#: Files the pytest-xdist processes of one run share (named after the run's ``testrun_uid``).
_TURNSTILE = "itrain-tests-{}-turnstile"
_ROOM = "itrain-tests-{}-room"


@pytest.fixture(autouse=True)
def alone_when_marked(request: pytest.FixtureRequest) -> Iterator[None]:
    """Under pytest-xdist (``-n 3``), a test marked ``alone`` runs while no other test does: it
    measures latency against a baseline it took itself, which a neighbour's load would skew.
    Every test holds the room shared, an ``alone`` test holds it exclusively; the turnstile makes
    a waiting ``alone`` test go next, before other tests start (no starvation). Without xdist it
    costs nothing."""
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if run is None:
        yield
        return
    alone = request.node.get_closest_marker("alone") is not None
    tmp = Path(tempfile.gettempdir())
    with open(tmp / _TURNSTILE.format(run), "a") as turnstile, open(tmp / _ROOM.format(run), "a") as room:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        try:
            fcntl.flock(room, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        finally:
            fcntl.flock(turnstile, fcntl.LOCK_UN)
        try:
            yield
        finally:
            fcntl.flock(room, fcntl.LOCK_UN)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer().start()
    previous = os.environ.get("ITRAIN_REDIS_URL")
    os.environ["ITRAIN_REDIS_URL"] = server.url
    get_settings.cache_clear()
    yield server
    server.close()
    if previous is None:
        os.environ.pop("ITRAIN_REDIS_URL", None)
    else:
        os.environ["ITRAIN_REDIS_URL"] = previous
    get_settings.cache_clear()


@pytest.fixture(scope="session")
def redis_url(redis_server: RedisServer) -> str:
    return redis_server.url


@pytest.fixture
def settings(redis_url: str) -> Settings:
    return Settings(redis_url=redis_url)


@pytest.fixture
def redis_client(redis_url: str) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def store(redis_client: redis.Redis, settings: Settings) -> Store:
    return Store(redis_client, settings)


@pytest.fixture
def model_name() -> str:
    return f"m-{uuid.uuid4().hex[:12]}"


ModelFactory = Callable[..., str]


@pytest.fixture
def make_model(redis_client: redis.Redis, settings: Settings) -> ModelFactory:
    """Creates an initialised model; keyword arguments are ``ModelConfig`` fields."""

    def make(name: str | None = None, **config: object) -> str:
        return create_model(redis_client, settings, name=name, **config)

    return make


@pytest.fixture
def client(redis_url: str) -> Iterator[TrainingClient]:
    with TrainingClient(redis_url=redis_url) as c:
        yield c


@pytest.fixture
def make_client() -> Iterator[ClientFactory]:
    """``make_client(redis_url, queue=..., chunk_size=...)``: a TrainingClient with these settings;
    every one is closed at teardown."""
    made: list[TrainingClient] = []

    def make(redis_url: str, **overrides: Any) -> TrainingClient:
        c = TrainingClient(settings=Settings(redis_url=redis_url, **overrides))
        made.append(c)
        return c

    yield make
    for c in made:
        c.close()


@pytest.fixture
def workers(tmp_path: Path) -> Iterator[Workers]:
    """The test's worker launcher (``tests.helpers.Workers``), on any Redis; every worker it
    started is stopped (by pid) at teardown. Logs go to ``tmp_path``."""
    w = Workers(tmp_path)
    yield w
    w.close()


WorkerFactory = Callable[..., list]


@pytest.fixture
def start_workers(redis_url: str, workers: Workers) -> WorkerFactory:
    """Starts ``celery -A worker worker`` processes on the session's Redis.

    ``start_workers(2, concurrency=1, env={"ITRAIN_LOCK_TIMEOUT": "1"})`` returns the Popen objects
    once all of them answer a ping.
    """

    def start(
        count: int = 1, *, concurrency: int = 1, env: dict[str, str] | None = None, pool: str = "prefork"
    ) -> list:
        return workers.start(count, redis_url=redis_url, env=env, concurrency=concurrency, pool=pool)

    return start
