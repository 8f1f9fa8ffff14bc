"""``itrain bench``: end-to-end throughput and latency, every design side by side in one run.

Self-contained: it starts its own ``redis-server`` on a free port and its own worker processes
(``celery -A worker.devtools.naive worker``: the production app plus the naive baseline's task,
one pool process each), so the figures of one run compare like
with like. Per scenario: events/s from the first enqueue to the last result written, per-event
latency (enqueue to result), lock wait and lock hold per critical section.

``--replicas N`` runs everything against a master with N replicas, and each scenario twice, side
by side: as usual, then with ``ITRAIN_MIN_REPLICAS=1`` (key ``<scenario>+wait1``): the price of
waiting for a replica to hold every push.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import redis
from rich.table import Table

from producer.client import TrainingClient
from producer.errors import ConfigurationError
from producer.keys import ModelKeys
from producer.server_version import read_server_version
from producer.settings import Settings
from worker.devtools import naive, stock_transport
from worker.devtools.embedded_redis import RedisServer, ReplicaSet
from worker.devtools.memory_figure import MemoryFigure, expiring_keys, memory_figure
from worker.devtools.message_path import MessagePathResult, child_pids, cpu_seconds, drain
from worker.devtools.naive import TASK_NAIVE, naive_init
from worker.devtools.pacing import send_paced
from worker.devtools.stack import start_worker, stop_process, wait_for_workers
from worker.devtools.synthetic import synthetic_events
from worker.engine.checkpoint import Checkpoint, Mode, ModelConfig
from worker.output import Output
from worker.store.model_store import Store

__all__ = ["ScenarioResult", "run_bench", "percentile"]


@dataclass
class ScenarioResult:
    key: str
    description: str
    workers: int
    events: int
    seconds: float
    events_per_s: float
    latency_p50_ms: float
    latency_p99_ms: float
    lock_wait_p50_ms: float | None
    lock_wait_p99_ms: float | None
    lock_hold_p50_ms: float | None
    lock_hold_p99_ms: float | None
    critical_sections: int
    statuses: dict[str, int] = field(default_factory=dict)
    offered_rate: float | None = None
    threads: int = 1
    #: CPU µs per event of each kind of process, read from /proc around the scenario: the
    #: producer (this process, every thread), redis-server, the worker main processes, their pool
    #: processes, and the total.
    cpu_us_per_event: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Scenario:
    key: str
    description: str
    workers: int
    events: int
    send: str  # naive | step | many
    mode: Mode = "per_event"
    rate: float | None = None
    #: Producer threads, each sending its share (``train_step`` only).
    threads: int = 1
    #: The client's ``linger_ms`` (``train_step`` only).
    linger_ms: float = 0.0
    #: Settings of the workers that run it, besides the bench's own (scenarios with different
    #: ones run on workers of their own).
    worker_env: tuple[tuple[str, str], ...] = ()


def percentile(values: Sequence[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q)) if len(values) else float("nan")


def plan(quick: bool) -> list[Scenario]:
    scale = 0.2 if quick else 1.0

    def n(x: int) -> int:
        return max(200, int(x * scale))

    out = [
        Scenario("a", "naive: task per event, Lock(sleep=0.1), GET/step/SET", 2, n(2000), "naive"),
        Scenario("d", "train_many, minibatch mode", 2, n(300_000), "many", "minibatch"),
        Scenario("latency", "train_step at a fixed 500 events/s", 2, n(5000), "step", rate=500.0),
        Scenario(
            "latency-many", "train_many, 25 events every 50 ms (500 events/s)", 2, n(5000), "many", rate=500.0
        ),
        Scenario("e", "train_step from 4 threads, one event a call", 2, n(8000), "step", threads=4),
    ]
    # The rate most deployments run at, with the fetch window that follows the arrival rate (the
    # default) and with the former rule (each message taken at once, then held for
    # ITRAIN_BATCH_WAIT_MS), each with and without the client's linger: side by side in one run.
    # And with each pool process fetching its own messages (ITRAIN_POOL_FETCH, "-pool").
    fixed = (("ITRAIN_BATCH_WAIT_ADAPTIVE", "0"),)
    pool = (("ITRAIN_POOL_FETCH", "1"),)
    for linger, suffix in ((0.0, ""), (2.0, "-linger2")):
        for env, rule in (((), ""), (fixed, "-fixed"), (pool, "-pool")):
            what = "train_step from 4 threads at 1,000 events/s in all"
            what += f", linger_ms={linger:g}" if linger else ""
            what += "".join(f", {name}={value}" for name, value in env)
            out.append(
                Scenario(
                    f"latency-4t{suffix}{rule}",
                    what,
                    2,
                    n(8000),
                    "step",
                    rate=1000.0,
                    threads=4,
                    linger_ms=linger,
                    worker_env=env,
                )
            )
    for w in (1, 2, 4):
        out.append(Scenario(f"b{w}", "train_step, one event a call", w, n(3000), "step"))
        out.append(Scenario(f"c{w}", "train_many, per_event mode", w, n(200_000), "many"))
    return sorted(out, key=lambda s: (s.workers != 2, s.workers, s.worker_env, s.key))


@contextmanager
def _workers(
    count: int, env: dict[str, str], client: TrainingClient, logs: Path
) -> Iterator[list[subprocess.Popen[bytes]]]:
    worker_logs = [logs / f"bench-worker{i + 1}.log" for i in range(count)]
    procs = [
        start_worker(
            f"bench{i + 1}-{uuid.uuid4().hex[:4]}",
            env,
            concurrency=1,
            loglevel="warning",
            log=log,
            app=naive.APP,  # the production tasks plus the naive baseline's
        )
        for i, log in enumerate(worker_logs)
    ]
    try:
        # A worker that exits or stays silent ends the run with the last lines of its log.
        wait_for_workers(client.app, count, procs=procs, logs=worker_logs, timeout=120)
        yield procs
    finally:
        for p in procs:
            stop_process(p)


def _new_model(store: Store, raw: redis.Redis, mode: Mode) -> str:
    name = f"bench-{uuid.uuid4().hex[:8]}"
    cfg = ModelConfig(mode=mode)
    store.create(name, Checkpoint.initial(cfg), force=False)
    naive_init(raw, name, cfg)
    return name


def _send(
    client: TrainingClient, sc: Scenario, events: list[dict[str, Any]]
) -> tuple[list[Any], list[float]]:
    """Enqueue; returns the handles and each event's enqueue time (epoch seconds)."""
    if sc.send == "many":
        return send_paced(events, client.train_many, rate=sc.rate)
    if sc.threads > 1:
        return _send_threads(client, sc, events)

    def one(part: Sequence[dict[str, Any]]) -> list[Any]:
        (event,) = part
        if sc.send == "naive":
            return [client.app.send_task(TASK_NAIVE, args=[event])]
        return [client.train_step(event)]

    return send_paced(events, one, rate=sc.rate, size=1)


def _send_threads(
    client: TrainingClient, sc: Scenario, events: list[dict[str, Any]]
) -> tuple[list[Any], list[float]]:
    """``train_step`` from ``sc.threads`` threads, one event a call, each thread its share of the
    events (and of the rate); handles and times come back in event order."""
    shares = [events[k :: sc.threads] for k in range(sc.threads)]
    out: list[tuple[list[Any], list[float]]] = [([], [])] * sc.threads
    rate = sc.rate / sc.threads if sc.rate else None
    # A lingering client is the service's one client, shared by its threads, as in production.
    lingering = TrainingClient(settings=client.settings, linger_ms=sc.linger_ms) if sc.linger_ms else None
    sender = lingering or client

    def run(k: int) -> None:
        out[k] = send_paced(shares[k], lambda part: [sender.train_step(part[0])], rate=rate, size=1)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(sc.threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if lingering is not None:
        lingering.close()  # sends what lingers
    handles: list[Any] = [None] * len(events)
    sent: list[float] = [0.0] * len(events)
    for k, (hs, ts) in enumerate(out):
        handles[k :: sc.threads] = hs
        sent[k :: sc.threads] = ts
    return handles, sent


_CPU_KINDS = ("producer", "redis", "worker_main", "pool")


class _Cpu:
    """CPU seconds of the processes of a run, by kind, read from /proc."""

    def __init__(self, redis_pid: int, workers: Sequence[subprocess.Popen[bytes]]) -> None:
        self.kinds: dict[str, list[int]] = {
            "producer": [os.getpid()],
            "redis": [redis_pid],
            "worker_main": [p.pid for p in workers],
            "pool": [c for p in workers for c in child_pids(p.pid)],
        }

    def read(self) -> dict[str, float]:
        return {kind: sum(cpu_seconds(pid) for pid in pids) for kind, pids in self.kinds.items()}


def _collect(
    client: TrainingClient, raw: redis.Redis, handles: list[Any], timeout: float
) -> list[tuple[str, float]]:
    """(status, completion time) of every result, once all are written."""
    results = client.wait_all(handles, timeout=timeout, poll=0.05)
    # Each result key once: the handles of a train_many chunk share theirs (and its date_done).
    keys = list(dict.fromkeys(h.key for h in handles))
    finished: dict[str, float] = {}
    for i in range(0, len(keys), 10_000):
        part = keys[i : i + 10_000]
        for key, meta in zip(part, raw.mget(part), strict=True):
            if meta is None:  # expired between the two reads: the run took longer than its TTL
                raise TimeoutError("a result expired before the benchmark read its completion time")
            finished[key] = datetime.fromisoformat(orjson.loads(meta)["date_done"]).timestamp()
    done = [finished[h.key] for h in handles]
    return [
        (r.get("status", "?") if isinstance(r, dict) else "failed", t)
        for r, t in zip(results, done, strict=True)
    ]


def _timings(raw: redis.Redis, model: str) -> tuple[list[float], list[float]]:
    rows = raw.lrange(ModelKeys(model).prefix + "timings", 0, -1)
    waits, holds = [], []
    for row in rows:
        w, h, _ = row.split()
        waits.append(float(w) * 1000)
        holds.append(float(h) * 1000)
    return waits, holds


def run_scenario(
    sc: Scenario, client: TrainingClient, store: Store, raw: redis.Redis, cpu: _Cpu
) -> ScenarioResult:
    model = _new_model(store, raw, sc.mode)
    events = synthetic_events(sc.events, users=10_000, model=model, seed=7)
    # The prepared events are the bench's fixture, not the producer's work: frozen, the garbage
    # collector no longer scans these hundreds of thousands of dicts during the run (a service
    # that sends events as they happen holds none of them), which otherwise adds ~3 us per
    # event to the producer's figure. Unfrozen after the run.
    gc.collect()
    gc.freeze()
    try:
        return _measure(sc, client, raw, cpu, model, events)
    finally:
        gc.unfreeze()


def _measure(
    sc: Scenario,
    client: TrainingClient,
    raw: redis.Redis,
    cpu: _Cpu,
    model: str,
    events: list[dict[str, Any]],
) -> ScenarioResult:
    cpu_before = cpu.read()
    first = time.time()
    handles, sent = _send(client, sc, events)
    results = _collect(client, raw, handles, timeout=max(120.0, sc.events / 200))
    cpu_after = cpu.read()
    used = {kind: (cpu_after[kind] - cpu_before[kind]) / sc.events * 1e6 for kind in cpu_after}
    # A forwarder (the hosts section) stands for the network: its CPU is reported apart.
    used["total"] = sum(us for kind, us in used.items() if kind != "forwarder")
    last = max(done for _, done in results)
    seconds = max(last - first, 1e-9)
    latencies = [(done - s) * 1000 for (_, done), s in zip(results, sent, strict=True)]
    waits, holds = _timings(raw, model)
    return ScenarioResult(
        key=sc.key,
        description=sc.description,
        workers=sc.workers,
        events=sc.events,
        seconds=round(seconds, 3),
        events_per_s=round(sc.events / seconds, 1),
        latency_p50_ms=round(percentile(latencies, 50), 2),
        latency_p99_ms=round(percentile(latencies, 99), 2),
        lock_wait_p50_ms=round(percentile(waits, 50), 3) if waits else None,
        lock_wait_p99_ms=round(percentile(waits, 99), 3) if waits else None,
        lock_hold_p50_ms=round(percentile(holds, 50), 3) if holds else None,
        lock_hold_p99_ms=round(percentile(holds, 99), 3) if holds else None,
        critical_sections=len(holds),
        statuses=dict(Counter(status for status, _ in results)),
        offered_rate=sc.rate,
        threads=sc.threads,
        cpu_us_per_event={kind: round(us, 1) for kind, us in used.items()},
    )


def machine() -> dict[str, Any]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "platform": platform.platform(),
    }


def run_bench(
    args: argparse.Namespace, console: Output, progress: Callable[[str], None] | None = None
) -> int:
    from worker.devtools import hosts

    say = progress or (lambda text: console.print(text))
    scenarios = plan(args.quick)
    only = getattr(args, "only", None)
    rtt_text = getattr(args, "rtt_ms", None)
    # Validated before anything starts, as --only is. --rtt-ms alone runs the hosts section
    # alone; the full run has it too, over the default round trips.
    rtts = hosts.parse_rtts(rtt_text) if rtt_text else None
    if rtts is not None and not only:
        scenarios = []
    elif rtts is None and not only:
        rtts = list(hosts.DEFAULT_RTTS)
    partial = bool(only) or not scenarios
    if only:
        wanted = {key.strip() for key in only.split(",")}
        unknown = wanted - {s.key for s in scenarios}
        if unknown:  # before anything starts: a typo must not run an empty benchmark
            known = ", ".join(s.key for s in scenarios)
            raise ConfigurationError(f"--only: no scenario {', '.join(sorted(unknown))} (known: {known})")
        scenarios = [s for s in scenarios if s.key in wanted]
    results: list[ScenarioResult] = []
    memory: list[MemoryFigure] = []
    replicas = int(getattr(args, "replicas", 0) or 0)
    with _redis(replicas) as server:
        env = {"ITRAIN_REDIS_URL": server.url, "ITRAIN_RECORD_TIMINGS": "1"}
        settings = Settings(redis_url=server.url)
        raw = redis.Redis.from_url(server.url)
        store = Store(raw, settings)
        # HELLO names the server and its own version (INFO says 7.2.4 for every Valkey).
        redis_version = str(read_server_version(raw))
        logs = Path(args.logs) if getattr(args, "logs", None) else Path(".itrain/logs")
        logs.mkdir(parents=True, exist_ok=True)
        # The same events again with a client that waits for one replica (--replicas).
        waiting = (
            TrainingClient(settings=settings.model_copy(update={"min_replicas": 1})) if replicas else None
        )
        with TrainingClient(settings=settings) as client:
            groups = sorted({(s.workers, s.worker_env) for s in scenarios}, key=lambda g: (g[0] != 2, g))
            for count, worker_env in groups:
                with _workers(count, {**env, **dict(worker_env)}, client, logs) as procs:
                    assert server.proc is not None
                    cpu = _Cpu(server.proc.pid, procs)
                    for sc in (s for s in scenarios if (s.workers, s.worker_env) == (count, worker_env)):
                        say(
                            f"scenario {sc.key}: {sc.description}, {sc.workers} worker(s), {sc.events} events"
                        )
                        results.append(run_scenario(sc, client, store, raw, cpu))
                        if waiting is not None:
                            say(f"scenario {sc.key} again, ITRAIN_MIN_REPLICAS=1 ({replicas} replicas)")
                            again = run_scenario(sc, waiting, store, raw, cpu)
                            again.key = f"{sc.key}+wait1"
                            again.description += f", ITRAIN_MIN_REPLICAS=1 of {replicas} replicas"
                            results.append(again)
                    if count == 2 and not worker_env and not partial:
                        memory = _memory(args.quick, client, store, raw, say)
            paths = [] if partial else _message_path(args.quick, env, client, store, raw, logs, say)
            links = hosts.run_hosts(rtts, args.quick, server, client, store, raw, logs, say) if rtts else []
        if waiting is not None:
            waiting.close()
    report: dict[str, Any] = {
        "machine": {**machine(), "redis": redis_version},
        "scenarios": [asdict(r) for r in results],
        "message_path": [asdict(p) for p in paths],
        "memory": [{**asdict(m), "total_mb_per_event_per_s": round(m.total_mb, 3)} for m in memory],
    }
    if links:
        report["hosts"] = hosts.report(links)
    order = {r.key: r for r in results}
    if {"a", "b2", "c2", "d"} <= order.keys():
        report["ratios"] = {
            "b2/a": round(order["b2"].events_per_s / order["a"].events_per_s, 2),
            "c2/a": round(order["c2"].events_per_s / order["a"].events_per_s, 2),
            "d/a": round(order["d"].events_per_s / order["a"].events_per_s, 2),
        }
    for r in results:
        if r.key.endswith("+wait1") and r.key[: -len("+wait1")] in order:
            base = order[r.key[: -len("+wait1")]]
            ratio = round(r.events_per_s / base.events_per_s, 2)
            report["ratios"] = {**report.get("ratios", {}), f"{r.key}/{base.key}": ratio}
    if len(paths) == 2:
        stock, ours = paths
        report["ratios"] = {
            **report.get("ratios", {}),
            "message_path_main_cpu_stock/itrain": round(
                stock.main_cpu_us_per_message / ours.main_cpu_us_per_message, 2
            ),
            "message_path_msgs_per_s_itrain/stock": round(ours.messages_per_s / stock.messages_per_s, 2),
        }
    # Only the tables of what ran: `--only` runs neither the message path nor the memory figure.
    if results:
        console.print(render(results, report))
    if links:
        console.print(hosts.render_hosts(links))
    if paths:
        console.print(render_message_path(paths))
    if memory:
        console.print(render_memory(memory))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
        console.print(f"wrote {args.json}")
    return 0


@contextmanager
def _redis(replicas: int) -> Iterator[RedisServer]:
    """The bench's Redis: a server of its own, or the master of a set with ``replicas`` replicas."""
    if not replicas:
        with RedisServer() as server:
            yield server
        return
    with ReplicaSet(replicas) as rs:
        yield rs.master


def _message_path(
    quick: bool,
    env: dict[str, str],
    client: TrainingClient,
    store: Store,
    raw: redis.Redis,
    logs: Path,
    say: Callable[[str], None],
) -> list[MessagePathResult]:
    """The message path, kombu's stock transport beside ours (see ``message_path``)."""
    n = 5000 if quick else 20_000
    out = []
    for label, app in (("kombu", stock_transport.APP), ("itrain", "worker")):
        say(f"message path: {n} train_step messages drained by one worker process, {label} transport")
        out.append(drain(label, app, _new_model(store, raw, "per_event"), n, env, client, raw, logs))
    return out


def _memory(
    quick: bool, client: TrainingClient, store: Store, raw: redis.Redis, say: Callable[[str], None]
) -> list[MemoryFigure]:
    """Redis memory per sustained event/s with the default settings (``memory_figure``), for a
    stream of ``train_step`` calls and one of ``train_many`` calls, each on a model of its own."""
    out = []
    for workload, n in (("train_step", 1000 if quick else 4000), ("train_many", 10_000 if quick else 40_000)):
        say(f"memory: {n} events through {workload}, Redis memory per sustained event/s")
        model = _new_model(store, raw, "per_event")
        before = expiring_keys(raw)
        events = synthetic_events(n, users=10_000, model=model, seed=11)
        if workload == "train_step":
            handles = [client.train_step(e) for e in events]
        else:
            handles = client.train_many(events)
        client.wait_all(handles, timeout=max(120.0, n / 200))
        out.append(memory_figure(raw, workload, n, before))
    return out


def render_memory(figures: list[MemoryFigure]) -> Table:
    title = "Redis memory per sustained event/s (default settings): Σ MEMORY USAGE × TTL / events"
    table = Table(title=title)
    for col in ("workload", "events", "results", "markers", "other", "total", "bytes/event results/markers"):
        table.add_column(col, justify="left" if col == "workload" else "right")
    for m in figures:
        per = m.bytes_per_event_per_s
        size = m.bytes_per_event
        table.add_row(
            m.workload,
            str(m.events),
            *(f"{per.get(k, 0.0) / 1e6:.3f} MB" for k in ("results", "markers", "other")),
            f"{m.total_mb:.3f} MB",
            f"{size.get('results', 0.0):.0f}/{size.get('markers', 0.0):.0f}",
        )
    return table


def render_message_path(paths: list[MessagePathResult]) -> Table:
    table = Table(title="message path: one worker process (prefork, concurrency 1, task events on)")
    for col in ("transport", "messages", "messages/s", "main CPU µs/msg", "pool CPU µs/msg"):
        table.add_column(col, justify="left" if col == "transport" else "right")
    for p in paths:
        table.add_row(
            p.transport,
            str(p.messages),
            f"{p.messages_per_s:,.0f}",
            f"{p.main_cpu_us_per_message:.0f}",
            f"{p.pool_cpu_us_per_message:.0f}",
        )
    return table


def render(results: list[ScenarioResult], report: dict[str, Any]) -> Table:
    m = report["machine"]
    table = Table(
        title=f"itrain bench: {m['cpu']}, {m['cores']} cores, Python {m['python']}, Redis {m['redis']}",
        caption="; ".join(sorted({f"{r.key.rstrip('124')}: {r.description}" for r in results})),
    )
    for col in (
        "scenario",
        "workers",
        "events",
        "events/s",
        "p50 ms",
        "p99 ms",
        "lock wait p50/p99",
        "lock hold p50/p99",
        "sections",
        "CPU µs/event prod/redis/main/pool",
    ):
        table.add_column(col, justify="left" if col == "scenario" else "right")

    def pair(a: float | None, b: float | None) -> str:
        return "-" if a is None or b is None else f"{a:.2f}/{b:.2f}"

    for r in sorted(results, key=lambda r: (r.key[0], r.workers)):
        table.add_row(
            r.key,
            str(r.workers),
            str(r.events),
            f"{r.events_per_s:,.0f}",
            f"{r.latency_p50_ms:.1f}",
            f"{r.latency_p99_ms:.1f}",
            pair(r.lock_wait_p50_ms, r.lock_wait_p99_ms),
            pair(r.lock_hold_p50_ms, r.lock_hold_p99_ms),
            str(r.critical_sections),
            "/".join(
                f"{r.cpu_us_per_event.get(k, 0):.0f}" for k in ("producer", "redis", "worker_main", "pool")
            ),
        )
    return table
