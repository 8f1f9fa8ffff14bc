"""A local stack for ``itrain up`` and the quickstart: Redis (embedded when none is reachable, or
a master with replicas under three sentinels), worker processes and Flower, all on 127.0.0.1, all
stopped together."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from producer.celery_config import make_celery
from producer.errors import ConfigurationError, ServerVersionError
from producer.redis_conn import redact_url
from producer.server_version import check_server_versions
from producer.settings import Settings
from worker.devtools.embedded_redis import RedisServer, free_port, is_reachable
from worker.devtools.sentinel_set import SentinelSet
from worker.devtools.stack import (
    node_name,
    start_exporter,
    start_flower,
    start_worker,
    stop_process,
    wait_for_workers,
)

__all__ = ["Stack", "local_stack", "stack_settings"]

_URL_VARS = ("ITRAIN_REDIS_URL", "ITRAIN_BROKER_URL", "ITRAIN_RESULT_BACKEND", "ITRAIN_STORE_URL")


@dataclass
class Stack:
    redis_url: str
    embedded: bool
    #: The embedded server's version and binary (``"Valkey 8.1.8 (/.../valkey-server)"``).
    server: str | None = None
    workers: list[str] = field(default_factory=list)
    flower_url: str | None = None
    exporter_url: str | None = None
    logs: Path | None = None
    #: Under Sentinel (``replicas`` > 0): the master group's name, the master's port, replicas, sentinels.
    master_name: str | None = None
    master_port: int | None = None
    replicas: int = 0
    sentinels: int = 0


@contextmanager
def local_stack(
    settings: Settings,
    *,
    workers: int = 2,
    concurrency: int = 2,
    flower: bool = True,
    flower_port: int = 5555,
    exporter_port: int | None = None,
    state_dir: Path = Path(".itrain"),
    loglevel: str = "info",
    embedded: bool = False,
    replicas: int = 0,
    sentinel_down_after_ms: int = 5000,
) -> Iterator[Stack]:
    """Bring the stack up; on exit (Ctrl-C included) stop every process it started, by pid.
    ``exporter_port``: also run ``itrain exporter`` there (127.0.0.1).

    With no ``ITRAIN_*_URL`` set and no Redis answering at the default URL, an embedded
    ``redis-server`` (append-only file in ``state_dir/redis``) is started on 127.0.0.1:6379, or
    on a free port when 6379 is taken by something that is not Redis. ``embedded`` always starts
    a private one on a free port, whatever is configured. A Redis older than the workers need
    is refused before any worker starts (``ServerVersionError``, one line); when a worker does
    not start, the error ends with the last lines of its log.

    ``replicas`` > 0: whatever is configured, a master, that many replicas and three sentinels of
    our own (``SentinelSet``, in ``state_dir/ha``, made afresh each time: the ports are new), and
    every process on their sentinel URL; a sentinel fails the master over after
    ``sentinel_down_after_ms`` without answers (5 s: a busy laptop is not a dead master).
    """
    state_dir.mkdir(parents=True, exist_ok=True)
    logs = state_dir / "logs"
    logs.mkdir(exist_ok=True)
    server: RedisServer | None = None
    group: SentinelSet | None = None
    procs: list[subprocess.Popen[bytes]] = []
    url = settings.redis_url
    configured = any(os.environ.get(v) for v in _URL_VARS)
    try:
        if replicas:
            shutil.rmtree(state_dir / "ha", ignore_errors=True)
            group = SentinelSet(
                replicas=replicas,
                sentinels=3,
                down_after_ms=sentinel_down_after_ms,
                data_dir=state_dir / "ha",
            )
            group.start()
            url = group.url()
        elif embedded or not is_reachable(settings.broker):
            if configured and not embedded:
                raise ConfigurationError(f"Redis at {redact_url(settings.broker)} is not reachable")
            port = 6379 if _port_free(6379) and not embedded else free_port()
            server = RedisServer(port, data_dir=state_dir / "redis", appendonly=True).start()
            url = server.url
        env = {"ITRAIN_REDIS_URL": url} if server or group else {}
        stack = Stack(redis_url=url, embedded=server is not None or group is not None, logs=logs)
        if server is not None:
            stack.server = f"{server.version} ({server.binary})"
        elif group is not None:
            env["ITRAIN_SENTINEL_MASTER"] = group.name
            stack.server = f"{group.servers[0].version} ({group.binary})"
            stack.master_name, stack.master_port = group.name, group.master_port()
            stack.replicas, stack.sentinels = replicas, len(group.sentinel_ports)
        else:
            _check_versions(settings, configured)
        names, worker_logs = [], []
        for i in range(workers):
            names.append(node_name(f"itrain{i + 1}"))
            worker_logs.append(logs / f"worker{i + 1}.log")
            procs.append(
                start_worker(
                    f"itrain{i + 1}",
                    env,
                    concurrency=concurrency,
                    log=worker_logs[-1],
                    loglevel=loglevel,
                )
            )
        if flower:
            procs.append(start_flower(flower_port, env, log=logs / "flower.log"))
            stack.flower_url = f"http://127.0.0.1:{flower_port}"
        if exporter_port is not None:
            procs.append(start_exporter(exporter_port, env, log=logs / "exporter.log"))
            scheme = "https" if settings.exporter_tls_cert else "http"  # (ITRAIN_EXPORTER_TLS_*)
            stack.exporter_url = f"{scheme}://127.0.0.1:{exporter_port}/metrics"
        app = make_celery(stack_settings(settings, stack))
        try:
            stack.workers = wait_for_workers(
                app, workers, names=names, procs=procs[:workers], logs=worker_logs, timeout=90
            )
        finally:
            app.close()
        yield stack
    finally:
        for proc in reversed(procs):
            stop_process(proc)
        if server is not None:
            server.stop()
        if group is not None:
            group.close()


def _check_versions(settings: Settings, configured: bool) -> None:
    try:
        check_server_versions(settings)
    except ServerVersionError as exc:
        if configured:
            raise
        hint = "--embedded-redis starts a private, new-enough server instead"
        raise ServerVersionError(f"{exc} ({hint})") from None


def stack_settings(settings: Settings, stack: Stack) -> Settings:
    """The settings that talk to this stack's Redis."""
    if not stack.embedded:
        return settings
    update = {"redis_url": stack.redis_url, "broker_url": None, "result_backend": None, "store_url": None}
    if stack.master_name:
        update["sentinel_master"] = stack.master_name
    return settings.model_copy(update=update)


def _port_free(port: int) -> bool:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        return s.connect_ex(("127.0.0.1", port)) != 0
