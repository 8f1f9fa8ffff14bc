"""The worker refuses to start on a Redis that may evict keys (``maxmemory-policy`` other than
``noeviction``), with one line naming the policy found and the fix; the test servers, Flower's
app and the compose file's Redis all run ``noeviction``."""

from __future__ import annotations

import subprocess
import time
import urllib.error
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from producer.client import TrainingClient
from producer.errors import ConfigurationError
from producer.settings import Settings
from tests.helpers import Workers, http_get, make_event
from tests.integration.test_compose import command_of
from worker.devtools.embedded_redis import RedisServer, free_port
from worker.devtools.stack import start_flower, start_worker, stop_process
from worker.store.eviction import check_eviction_policies, eviction_policy

ROOT = Path(__file__).resolve().parents[2]


def _run_worker(env: dict[str, str], log: Path, timeout: float = 60.0) -> tuple[int, str]:
    proc = start_worker("evict", env, concurrency=1, log=log)
    try:
        code = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"the worker did not exit within {timeout:g} s:\n{log.read_text()}") from None
    return code, log.read_text(errors="replace")


@pytest.fixture
def lru_redis() -> Iterator[RedisServer]:
    with RedisServer(extra=["--maxmemory-policy", "allkeys-lru"]) as server:
        yield server


def test_worker_refuses_an_evicting_store(lru_redis: RedisServer, tmp_path: Path) -> None:
    # Given a Redis that evicts any key when full
    # When a worker starts on it
    code, out = _run_worker({"ITRAIN_REDIS_URL": lru_redis.url}, tmp_path / "w.log")
    # Then it exits non-zero with one line naming the policy and the fix, and no traceback
    assert code != 0
    lines = [line for line in out.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, out
    assert "maxmemory-policy allkeys-lru" in lines[0]
    assert "CONFIG SET maxmemory-policy noeviction" in lines[0]
    assert "maxmemory-policy noeviction` in redis.conf" in lines[0]
    assert "Traceback" not in out
    # and it never consumed: no worker registered in the broker
    assert not redis.Redis.from_url(lru_redis.url).exists("_kombu.binding.itrain")


def test_worker_refuses_an_evicting_result_backend(
    redis_url: str, lru_redis: RedisServer, tmp_path: Path
) -> None:
    # Given a store and broker on noeviction, and a result backend on volatile-lru
    redis.Redis.from_url(lru_redis.url).config_set("maxmemory-policy", "volatile-lru")
    env = {"ITRAIN_REDIS_URL": redis_url, "ITRAIN_RESULT_BACKEND": lru_redis.url}
    # When a worker starts, then it names the result backend's Redis and its policy
    code, out = _run_worker(env, tmp_path / "w.log")
    assert code != 0
    line = next(line for line in out.splitlines() if line.startswith("error: "))
    assert "the result backend Redis" in line, line
    assert "volatile-lru" in line, line
    assert f"{lru_redis.port}" in line


def test_flower_and_the_producer_do_not_check(lru_redis: RedisServer, tmp_path: Path) -> None:
    # Given a Redis that evicts: publishing still works (the check belongs to the worker alone)
    with TrainingClient(redis_url=lru_redis.url) as client:
        client.train_step(make_event("default", 0, "lru"))
        assert client.queue_length() == 1
    # and Flower, which imports the same app, starts and serves its pages
    port = free_port()
    log = tmp_path / "flower.log"
    proc = start_flower(port, {"ITRAIN_REDIS_URL": lru_redis.url}, log=log)
    try:
        deadline = time.monotonic() + 60
        status = None
        while status is None and time.monotonic() < deadline:
            assert proc.poll() is None, log.read_text(errors="replace")
            try:
                status = http_get(f"http://127.0.0.1:{port}/healthcheck")[0]
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.2)
        assert status == 200, log.read_text(errors="replace")
        assert "maxmemory-policy" not in log.read_text(errors="replace")
    finally:
        stop_process(proc)


def test_check_names_each_role_that_differs(redis_url: str, lru_redis: RedisServer) -> None:
    # The store's server is noeviction; the broker's is not
    with pytest.raises(ConfigurationError, match=r"the broker Redis .* maxmemory-policy allkeys-lru"):
        check_eviction_policies(Settings(redis_url=redis_url, broker_url=lru_redis.url))
    with pytest.raises(ConfigurationError, match=r"the store, broker and result backend Redis"):
        check_eviction_policies(Settings(redis_url=lru_redis.url))
    check_eviction_policies(Settings(redis_url=redis_url))


def test_check_reads_info_when_config_is_refused(tmp_path: Path) -> None:
    # Given a user that may run INFO but not CONFIG (a managed Redis, a least-privilege ACL)
    with RedisServer(password="adminpw") as server:
        admin = redis.Redis.from_url(server.url)
        admin.acl_setuser("reader", enabled=True, passwords=["+pw"], commands=["+info", "+ping"], keys=[])
        url = f"redis://reader:pw@127.0.0.1:{server.port}/0"
        with pytest.raises(redis.exceptions.NoPermissionError):
            redis.Redis.from_url(url).config_get("maxmemory-policy")
        # Then the check still reads the policy
        assert eviction_policy(redis.Redis.from_url(url)) == "noeviction"
        check_eviction_policies(Settings(redis_url=url))


def test_test_servers_and_a_normal_worker_run_noeviction(
    redis_url: str, redis_client: redis.Redis, workers: Workers
) -> None:
    # The session's private server is noeviction, and a worker starts on it
    assert eviction_policy(redis_client) == "noeviction"
    (proc,) = workers.start(1, redis_url=redis_url)
    assert proc.poll() is None
    assert "maxmemory-policy" not in workers.log(proc)


def test_compose_redis_sets_noeviction() -> None:
    yaml = pytest.importorskip("yaml")
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    cmd = command_of(services["redis"])
    assert "--maxmemory-policy" in cmd, cmd
    assert cmd[cmd.index("--maxmemory-policy") + 1] == "noeviction"
    # and that command line, run here, gives a server the worker accepts
    args = cmd[cmd.index("--maxmemory-policy") : cmd.index("--maxmemory-policy") + 2]
    with RedisServer(extra=args) as server:
        check_eviction_policies(Settings(redis_url=server.url))
