"""How long training stops when the master dies: ``python -m worker.devtools.failover_timing``.

A master, two replicas and three sentinels of our own (``SentinelSet``), ``--workers`` real
workers and a producer thread (``train_step`` at ``--rate`` a second) on the sentinel URL. Each
run kills the master (-9) and reports, from the kill: when the first sentinel named another
master, and when the checkpoint's version on that new master first passed every version the
replicas held at the kill (the first commit there). The killed server then comes back as a
replica of the new master before the next run. ``ITRAIN_*`` settings in the environment reach
the workers (e.g. ``ITRAIN_LOCK_TIMEOUT``), so settings can be compared.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import redis

from producer.client import TrainingClient
from producer.errors import PublishError
from producer.keys import ModelKeys
from producer.redis_conn import connect
from producer.settings import Settings
from worker.devtools.sentinel_set import SentinelSet
from worker.devtools.stack import node_name, start_worker, stop_process, wait_for_workers
from worker.engine.checkpoint import Checkpoint, ModelConfig
from worker.store.model_store import Store

__all__ = ["main", "measure_kill"]

MODEL = "failover-timing"


def _version(group: SentinelSet, port: int) -> int:
    with group.server_client(port) as client:
        return int(client.hget(ModelKeys(MODEL).ckpt, "version") or 0)


def _stream(url: str, rate: float, stop: threading.Event) -> None:
    with TrainingClient(url) as client:
        i = 0
        while not stop.is_set():
            event = {"user_id": f"u{i % 97}", "action_type": "click", "timestamp": 1.7e9 + i, "model": MODEL}
            # While no master answers a call fails within ITRAIN_PUBLISH_TIMEOUT: the stream goes on.
            with contextlib.suppress(PublishError):
                client.train_step(event, result=False)
            i += 1
            stop.wait(1 / rate)


def measure_kill(group: SentinelSet, timeout: float = 60.0) -> tuple[float, float]:
    """kill -9 the master; (seconds to the sentinels' switch, seconds to the first commit on the
    new master). The killed server is restarted as a replica of the new one afterwards."""
    old = group.master_port()
    server = group.server(old)
    replicas = [s.port for s in group.servers if s.port != old]
    killed_at = time.monotonic()
    server.kill()
    # Nothing reaches the replicas after the kill: their versions are the bar to pass.
    bar = max(_version(group, port) for port in replicas)
    switched = committed = 0.0
    while time.monotonic() - killed_at < timeout:
        try:
            port = group.master_port()
            if port != old:
                switched = switched or time.monotonic() - killed_at
                if _version(group, port) > bar:
                    committed = time.monotonic() - killed_at
                    break
        except (redis.RedisError, OSError):
            pass
        time.sleep(0.02)
    new = group.wait_new_master(old, timeout)
    server.extra = [*server.extra, "--replicaof", "127.0.0.1", str(new)]
    server.start()
    _wait_attached(group, new, len(group.servers) - 1, timeout)
    return switched, committed


def _wait_attached(group: SentinelSet, master: int, replicas: int, timeout: float) -> None:
    """Until ``master`` has ``replicas`` replicas online. (``SentinelSet.wait_ready`` also wants
    their offsets equal to the master's, which a stream of writes never lets happen.)"""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(redis.RedisError, OSError), group.server_client(master) as client:
            info = client.info("replication")
            online = [
                k
                for k in range(int(info.get("connected_slaves", 0)))
                if info[f"slave{k}"]["state"] == "online"
            ]
            if len(online) >= replicas:
                return
        time.sleep(0.1)
    raise TimeoutError(f"the replicas did not attach to 127.0.0.1:{master} within {timeout:g} s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rate", type=float, default=50.0, help="train_step calls a second")
    parser.add_argument("--down-after-ms", type=int, default=1000)
    args = parser.parse_args(argv)
    with (
        tempfile.TemporaryDirectory(prefix="itrain-failover-") as tmp,
        SentinelSet(data_dir=Path(tmp) / "sentinels", down_after_ms=args.down_after_ms) as group,
    ):
        url = group.url(master_name=True)
        settings = Settings(redis_url=url)
        Store(connect(settings.store, 5), settings).create(
            MODEL, Checkpoint.initial(ModelConfig()), force=True
        )
        env = {**os.environ, "ITRAIN_REDIS_URL": url, "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
        procs = [
            start_worker(f"ft{i}", env, concurrency=1, log=Path(tmp) / f"ft{i}.log")
            for i in range(args.workers)
        ]
        stop = threading.Event()
        producer = threading.Thread(target=_stream, args=(url, args.rate, stop), daemon=True)
        try:
            wait_for_workers(
                TrainingClient(url).app, names=[node_name(f"ft{i}") for i in range(args.workers)], procs=procs
            )
            producer.start()
            time.sleep(3)
            print(
                f"sentinels: down-after-milliseconds {args.down_after_ms}, quorum {group.quorum}, "
                f"failover-timeout {group.failover_timeout_ms}; "
                f"{args.workers} worker(s), {args.rate:g} train_step/s"
            )
            commits = []
            for run in range(1, args.runs + 1):
                switched, committed = measure_kill(group)
                commits.append(committed)
                print(
                    f"run {run}: sentinels switched +{switched:.2f} s, "
                    f"first commit on the new master +{committed:.2f} s"
                )
                time.sleep(3)
            print(
                f"first commit after the kill: median {statistics.median(commits):.2f} s, "
                f"max {max(commits):.2f} s"
            )
        finally:
            stop.set()
            producer.join(30)
            for proc in procs:
                stop_process(proc)


if __name__ == "__main__":
    main()
