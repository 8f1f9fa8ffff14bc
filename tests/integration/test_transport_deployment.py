"""Our transport where it meets the rest of a deployment: Flower's broker pages, and TLS.

The worker app names its broker ``itrain://`` (``itrains://`` for TLS); Flower, started from the
same app, must still read the queue (its broker pages choose their Redis client by the URL's
scheme), and a worker must consume through our transport over ``rediss://``.
"""

from __future__ import annotations

import base64
import shutil
import subprocess
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from producer.client import TrainingClient
from producer.protocol import TASK_TRAIN_STEP, encode_envelope, new_task_id
from producer.settings import Settings
from tests.helpers import Workers, create_model, make_event, wait_until
from worker.devtools.embedded_redis import find_redis_server, free_port
from worker.devtools.stack import start_flower, stop_process

AUTH = "tester:s3cret"


def _get(url: str, auth: str | None = AUTH) -> tuple[int, bytes]:
    request = urllib.request.Request(url)
    if auth:
        request.add_header("Authorization", "Basic " + base64.b64encode(auth.encode()).decode())
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture
def flower(redis_url: str, tmp_path: Path) -> Iterator[tuple[str, str]]:
    """Flower of the worker app, with basic auth, on a queue of the test's own: (base URL, queue)."""
    queue = f"fq-{uuid.uuid4().hex[:8]}"
    port = free_port()
    env = {"ITRAIN_REDIS_URL": redis_url, "ITRAIN_QUEUE": queue, "FLOWER_BASIC_AUTH": AUTH}
    proc = start_flower(port, env, log=tmp_path / "flower.log")
    base = f"http://127.0.0.1:{port}"
    try:
        wait_until(lambda: _reachable(base), 60, f"Flower on {base}; log {tmp_path / 'flower.log'}")
        yield base, queue
    finally:
        stop_process(proc)


def _reachable(base: str) -> bool:
    try:
        return _get(base + "/healthcheck", auth=None)[0] == 200
    except OSError:
        return False


def test_flower_broker_pages_read_the_queue(flower: tuple[str, str], redis_client: redis.Redis) -> None:
    base, queue = flower
    # Given three messages waiting on the queue
    event = make_event("default", 0, "flower")
    redis_client.lpush(
        queue, *[encode_envelope(TASK_TRAIN_STEP, new_task_id(), [event], queue) for _ in range(3)]
    )
    # Then Flower's queue API counts them (it needs its Redis client, chosen by the URL scheme)
    status, body = _get(base + "/api/queues/length")
    assert status == 200, body
    assert {"name": queue, "messages": 3} in orjson.loads(body)["active_queues"]
    # And its broker page shows a redis:// URL, not the transport's scheme
    status, page = _get(base + "/broker")
    assert status == 200
    assert b"redis://" in page
    assert b"itrain://" not in page
    # And nothing answers without credentials
    assert _get(base + "/api/queues/length", auth=None)[0] == 401


# -- TLS ----------------------------------------------------------------------------------------------


def _certificates(directory: Path) -> None:
    """A private CA and a server certificate for 127.0.0.1 and localhost (openssl)."""

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    run(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
        "-days", "2", "-subj", "/CN=itrain-test-ca",
    )  # fmt: skip
    (directory / "ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    )
    run(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "2", "-extfile", "ext",
    )  # fmt: skip


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A redis-server that speaks TLS only: (rediss URL that verifies it, CA file)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make the test's certificates")
    certs = tmp_path / "certs"
    certs.mkdir()
    _certificates(certs)
    port = free_port()
    proc = subprocess.Popen(
        [
            find_redis_server(), "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
            "--tls-cert-file", str(certs / "server.crt"), "--tls-key-file", str(certs / "server.key"),
            "--tls-ca-cert-file", str(certs / "ca.crt"), "--tls-auth-clients", "no",
            "--save", "", "--appendonly", "no", "--dir", str(tmp_path),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"rediss://127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={certs / 'ca.crt'}"
    try:
        wait_until(lambda: _tls_ping(url), 20, "the TLS redis-server")
        yield url, certs / "ca.crt"
    finally:
        proc.terminate()
        proc.wait(10)


def _tls_ping(url: str) -> Any:
    try:
        return redis.Redis.from_url(url, socket_timeout=1).ping()
    except (redis.ConnectionError, OSError):
        return False


def test_a_worker_consumes_over_tls_through_our_transport(
    tls_redis: tuple[str, Path], tmp_path: Path
) -> None:
    url, _ = tls_redis
    admin = redis.Redis.from_url(url, socket_timeout=5)
    settings = Settings(redis_url=url)
    model = create_model(admin, settings)
    workers = Workers(tmp_path)
    try:
        workers.start(1, redis_url=url, concurrency=1)
        with TrainingClient(settings=settings) as client:
            results = client.wait_all(
                [client.train_step(make_event(model, i, "tls")) for i in range(20)], timeout=60
            )
        assert [r["status"] for r in results] == ["trained"] * 20
        # Our fetch script and wait ran on this server: the stock transport uses neither.
        stats = admin.info("commandstats")
        assert stats.get("cmdstat_evalsha", {}).get("calls", 0) > 0
        assert stats.get("cmdstat_blmove", {}).get("calls", 0) > 0
        # Acked after their results were written.
        wait_until(lambda: admin.hlen("unacked") == 0, 10, "the acks")
    finally:
        workers.close()
        admin.close()
