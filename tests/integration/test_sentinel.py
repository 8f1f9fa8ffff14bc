"""Every component on a sentinel URL: a master, two replicas and three sentinels of our own
(``worker.devtools.sentinel_set``), a real worker, both clients, the result backend and ``itrain``."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from producer.async_client import AsyncTrainingClient
from producer.client import TrainingClient
from producer.errors import ConfigurationError
from producer.redis_conn import connect
from producer.sentinel import MASTER_CHECK_INTERVAL
from producer.settings import Settings
from tests.helpers import (
    Workers,
    check_each_event_once,
    create_model,
    http_get,
    make_certificates,
    make_event,
    statuses,
    wait_until,
)
from worker.devtools.embedded_redis import free_port
from worker.devtools.sentinel_set import SentinelSet, sentinel_fields
from worker.devtools.stack import ROOT, flower_command, start_process, stop_process
from worker.ops.acl import acl_lines, unknown_commands

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def sentinels(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SentinelSet]:
    with SentinelSet(data_dir=tmp_path_factory.mktemp("sentinels")) as group:
        yield group


def _settings(url: str) -> Settings:
    return Settings(redis_url=url, history_max=10_000)


def _send_both(url: str, model: str, tag: str, count: int) -> tuple[list[Any], list[str]]:
    """``count`` events from each client (half ``train_many``, half ``train_step``): handles, ids."""
    events = [make_event(model, i, f"{tag}-sync") for i in range(count)]
    with TrainingClient(url) as client:
        handles = client.train_many(events[: count // 2])
        handles += [client.train_step(e) for e in events[count // 2 :]]
        # One handle through Celery's result backend (our SentinelBackend), the rest in bulk.
        first = handles[count // 2].get(timeout=120)
        assert first["status"] == "trained"
        results = client.wait_all(handles, timeout=120)

    async def send_async() -> list[Any]:
        async with AsyncTrainingClient(url) as aclient:
            more = [make_event(model, i, f"{tag}-async") for i in range(count)]
            hs = await aclient.train_many(more[: count // 2])
            hs += [await aclient.train_step(e) for e in more[count // 2 :]]
            events.extend(more)
            return await aclient.wait_all(hs, timeout=120)

    results += asyncio.run(send_async())
    return results, [e["event_id"] for e in events]


def _itrain(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        env={**os.environ, **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_a_worker_trains_what_both_clients_send_through_the_sentinels(
    sentinels: SentinelSet, workers: Workers
) -> None:
    # Given a worker and clients that know only the sentinels' addresses
    url = sentinels.url(master_name=True)
    settings = _settings(url)
    model = create_model(connect(settings.store, 5), settings)
    workers.start(1, redis_url=url, env={"ITRAIN_HISTORY_MAX": "10000"})
    # When each client sends events
    results, ids = _send_both(url, model, "a", 20)
    # Then every one trained once, on the master the sentinels name
    assert statuses(results) == {"trained": 40}
    master = sentinels.server_client(sentinels.master_port())
    assert check_each_event_once(master, model, ids)["step"] == 40


def test_itrain_on_a_sentinel_url(sentinels: SentinelSet) -> None:
    # Given the master's name in ITRAIN_SENTINEL_MASTER, not in the URL
    env = {"ITRAIN_REDIS_URL": sentinels.url(), "ITRAIN_SENTINEL_MASTER": sentinels.name}
    model = f"m-{uuid.uuid4().hex[:8]}"
    # When a model is made and read with itrain
    made = _itrain(env, "init", "--model", model)
    stats = _itrain(env, "stats", "--model", model, "--json")
    # Then both work on the master
    assert made.returncode == 0, made.stderr
    assert stats.returncode == 0, stats.stderr
    assert json.loads(stats.stdout)["initialized"] is True
    assert sentinels.server_client(sentinels.master_port()).exists(f"itrain:{{{model}}}:ckpt")
    # And without the master's name: one line that names the setting
    missing = _itrain({"ITRAIN_REDIS_URL": sentinels.url(), "ITRAIN_SENTINEL_MASTER": ""}, "stats")
    assert missing.returncode != 0
    assert "ITRAIN_SENTINEL_MASTER" in missing.stderr
    assert "Traceback" not in missing.stderr


def test_every_sentinel_of_the_url_is_asked(sentinels: SentinelSet, workers: Workers) -> None:
    # Given the first sentinel of the URL down
    sentinels.stop_sentinel(0)
    try:
        url = sentinels.url(master_name=True)
        settings = _settings(url)
        model = create_model(connect(settings.store, 5), settings)
        # When a worker starts and clients send (kombu's own channel would ask the first only)
        (proc,) = workers.start(1, redis_url=url, env={"ITRAIN_HISTORY_MAX": "10000"})
        results, ids = _send_both(url, model, "b", 10)
        # Then the others named the master to all of them, the worker's consumer at once (not
        # after failing over to the URL's next part)
        assert statuses(results) == {"trained": 20}
        assert "Cannot connect" not in workers.log(proc), workers.tail(proc)
        assert (
            check_each_event_once(sentinels.server_client(sentinels.master_port()), model, ids)["step"] == 20
        )
    finally:
        sentinels.start_sentinel(0)
        sentinels.wait_ready()


def _check_flower_broker_pages(sentinels: SentinelSet, tmp_path: Path) -> None:
    """Flower on the sentinel URL (the master's name from the environment) reads a queued item
    through its broker pages."""
    master = sentinels.server_client(sentinels.master_port())
    master.delete("itrain")
    master.rpush("itrain", b"{}")
    port = free_port()
    log = tmp_path / "flower.log"
    env = {"ITRAIN_REDIS_URL": sentinels.url(), "ITRAIN_SENTINEL_MASTER": sentinels.name}
    proc = start_process([*flower_command(port), "--basic-auth=ops:flower-pw"], env, log)
    try:
        base = f"http://127.0.0.1:{port}"

        def answers() -> bool:
            assert proc.poll() is None, log.read_text()[-2000:]
            try:
                return http_get(f"{base}/healthcheck")[0] == 200
            except OSError:
                return False

        wait_until(answers, 60, "Flower to answer")
        # When its broker pages are read, then they answer with the master's queue
        status, body = http_get(f"{base}/api/queues/length", ("ops", "flower-pw"))
        assert status == 200, log.read_text()[-2000:]
        assert {"name": "itrain", "messages": 1} in json.loads(body)["active_queues"]
        status, _ = http_get(f"{base}/broker", ("ops", "flower-pw"))
        assert status == 200, log.read_text()[-2000:]
    finally:
        stop_process(proc)
        master.delete("itrain")


def test_flower_broker_pages_on_a_sentinel_url(sentinels: SentinelSet, tmp_path: Path) -> None:
    _check_flower_broker_pages(sentinels, tmp_path)


def test_flower_broker_pages_ask_the_next_sentinel_when_the_first_is_down(
    sentinels: SentinelSet, tmp_path: Path
) -> None:
    # Given the first sentinel of the URL down (Flower parses that one address from the URL)
    sentinels.stop_sentinel(0)
    try:
        # Then Flower's broker pages still answer, through the next sentinel
        _check_flower_broker_pages(sentinels, tmp_path)
    finally:
        sentinels.start_sentinel(0)
        sentinels.wait_ready()


def test_the_sentinel_acl_role_is_all_that_every_component_needs(
    sentinels: SentinelSet, workers: Workers
) -> None:
    # Given the sentinel role's user on every sentinel, and no other way in
    unknown = unknown_commands(sentinels.server_client(sentinels.master_port()))
    setuser = acl_lines("sentinel", "itrain-sentinel", "itrain", "sentinel-pw", unknown)[1].split()
    clients = [sentinels.sentinel_client(i) for i in range(len(sentinels.sentinel_ports))]
    for client in clients:
        client.execute_command(*setuser)
        client.execute_command("ACL", "LOG", "RESET")
        client.execute_command("ACL", "SETUSER", "default", "off")
    try:
        # (the clients here take the login from the URL; the worker and itrain from the settings)
        login = "sentinel_username=itrain-sentinel&sentinel_password=sentinel-pw"
        url = sentinels.url(master_name=True).replace("?", f"?{login}&")
        env = {
            "ITRAIN_REDIS_URL": sentinels.url(master_name=True),
            "ITRAIN_SENTINEL_USERNAME": "itrain-sentinel",
            "ITRAIN_SENTINEL_PASSWORD": "sentinel-pw",
        }
        settings = _settings(url)
        model = create_model(connect(settings.store, 5), settings)
        # When a worker, both clients and itrain ask the sentinels as that user
        workers.start(1, redis_url=url, env={**env, "ITRAIN_HISTORY_MAX": "10000"})
        results, _ = _send_both(url, model, "acl", 6)
        stats = _itrain(env, "stats", "--model", model, "--json")
        # Then they all found the master, and no sentinel refused anything
        assert statuses(results) == {"trained": 12}
        assert stats.returncode == 0, stats.stderr
    finally:
        for client in clients:
            client.execute_command("ACL", "SETUSER", "default", "on")
    for client in clients:
        assert client.execute_command("ACL", "LOG") == [], "a sentinel refused a command"


def test_the_worker_and_the_clients_carry_on_after_a_failover(tmp_path: Path, workers: Workers) -> None:
    with SentinelSet(data_dir=tmp_path / "sentinels") as group:
        # Given a worker and clients on the sentinels, and events trained on the first master
        url = group.url(master_name=True)
        settings = _settings(url)
        model = create_model(connect(settings.store, 5), settings)
        (proc,) = workers.start(1, redis_url=url, env={"ITRAIN_HISTORY_MAX": "10000"})
        pool = set(workers.pool(proc))
        first = group.master_port()
        sync = TrainingClient(url)
        try:
            before = [make_event(model, i, "before") for i in range(30)]
            assert statuses(sync.wait_all(sync.train_many(before), timeout=120)) == {"trained": 30}
            # When the sentinels fail the master over (and the old one is a replica again)
            second = group.failover()
            assert second != first
            # Then the same worker and the same client train what is sent next
            after = [make_event(model, i, "after") for i in range(30)]
            handles = sync.train_many(after[:15]) + [sync.train_step(e) for e in after[15:]]
            assert handles[-1].get(timeout=120)["status"] == "trained"
            assert statuses(sync.wait_all(handles, timeout=120)) == {"trained": 30}
        finally:
            sync.close()
        ids = [e["event_id"] for e in before + after]
        evidence = check_each_event_once(group.server_client(second), model, ids)
        assert evidence["step"] == 60
        assert evidence["marked"] == 60
        workers.assert_alive([proc])
        assert set(workers.pool(proc)) == pool, "the worker's pool was restarted"


def test_tls_options_of_a_sentinel_url_reach_the_master_and_the_sentinels(
    tmp_path: Path, workers: Workers
) -> None:
    # Given servers and sentinels that speak TLS only, with a CA of the test's own
    if shutil.which("openssl") is None:
        pytest.skip("openssl is needed to make the test's certificates")
    certs = tmp_path / "certs"
    certs.mkdir()
    make_certificates(certs)
    group = SentinelSet(replicas=1, data_dir=tmp_path / "sentinels", tls_dir=certs)
    try:
        try:
            group.start()
        except ConfigurationError:
            log = tmp_path / "sentinels" / "redis0" / "redis.log"
            if log.exists() and "Failed finding TLS support" in log.read_text(errors="replace"):
                pytest.skip(f"{group.binary} is built without TLS")
            raise
        url = group.url(master_name=True)
        assert "ssl_cert_reqs=required" in url
        settings = _settings(url)
        model = create_model(connect(settings.store, 5), settings)
        # When a worker and a client use its sentinel URL
        workers.start(1, redis_url=url, env={"ITRAIN_HISTORY_MAX": "10000"})
        with TrainingClient(url) as client:
            handles = client.train_many([make_event(model, i, "tls") for i in range(10)])
            results = client.wait_all(handles, timeout=120)
            # Then the events train, the handle's own get() too (the result backend over TLS)
            assert handles[0].get(timeout=60)["status"] == "trained"
        assert statuses(results) == {"trained": 10}
        # And without the CA the certificate check refuses the sentinels
        untrusted = url.replace(f"ssl_ca_certs={certs / 'ca.crt'}", f"ssl_ca_certs={certs / 'server.crt'}")
        with pytest.raises(redis.ConnectionError):
            connect(untrusted, 5).ping()
        workers.close()  # (while its Redis still runs: a warm shutdown without one hangs)
    finally:
        group.close()


def test_clients_leave_a_replaced_master_before_it_is_demoted(tmp_path: Path) -> None:
    with SentinelSet(data_dir=tmp_path / "sentinels") as group:
        # Given a client's pushes on the master, through held connections and the pool
        url = group.url(master_name=True)
        client = TrainingClient(url)
        try:
            client.train_many([make_event("m", 0, "before")])
            old = group.master_port()
            pushed_at = time.monotonic()
            # When the sentinels fail over and all report the new master, the old one still a master
            with group.sentinel_client(0) as sentinel:
                sentinel.execute_command("SENTINEL", "FAILOVER", group.name)

            def reported() -> bool:
                ports = set()
                for i in range(len(group.sentinel_ports)):
                    with group.sentinel_client(i) as sentinel:
                        state = sentinel.execute_command("SENTINEL", "MASTER", group.name)
                        ports.add(int(sentinel_fields(state)["port"]))
                return ports != {old} and len(ports) == 1

            wait_until(reported, 60, "every sentinel to report the new master")
            wait_until(lambda: time.monotonic() - pushed_at > MASTER_CHECK_INTERVAL, 10, "a check to be due")
            if group.server_client(old).info("replication")["role"] != "master":
                pytest.skip("the old master was demoted already: nothing to leave")
            client.train_many([make_event("m", 1, "after")])

            async def push_async() -> None:
                async with AsyncTrainingClient(url) as aclient:
                    await aclient.train_many([make_event("m", 2, "after")])

            asyncio.run(push_async())
            # Then both pushes went to the new master (the old one's writes are wiped when it
            # turns replica)
            still = group.server_client(old).info("replication")["role"] == "master"
            assert group.server_client(group.master_port()).llen("itrain") == 3
            assert still, "the old master was demoted during the pushes: the test proved nothing"
        finally:
            client.close()
