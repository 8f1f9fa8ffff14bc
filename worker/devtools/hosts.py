"""The bench's ``hosts`` section: workers on other hosts, with a network between them and Redis.

Every other figure of ``itrain bench`` has the producer, Redis and the workers on one host. Here
the two workers reach Redis through the dev tools' forwarder (``worker/devtools/forwarder.py``,
a process of its own so that its CPU is counted apart) with a one-way delay of X/2 ms, so each
round trip costs X ms more (``tc netem`` needs a kernel module our machines lack). The producer
stays beside Redis. For each link, side by side in one run: ``train_many`` throughput (as ``c2``),
``train_step`` latency at 1,000 events/s offered from 4 threads (as ``latency-4t``), the lock's
hold, CPU per event, and the requests the workers sent per critical section and per event
(the forwarder's count of round trips). ``direct`` is the same run with no forwarder at all;
``0 ms`` is the forwarder with no delay, the base the others are compared with.

Every link has its own two workers on a queue of its own, all started at once, and the links
take turns in rounds (each round starting at the next link), so that a shared machine's drift
falls on every link alike; each link's figures are its median run, and its ratio to 0 ms the
median of the rounds' paired ratios.
"""

from __future__ import annotations

import json
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import redis
from rich.table import Table

from producer.client import TrainingClient
from producer.errors import ConfigurationError
from worker.devtools import naive
from worker.devtools.bench import Scenario, ScenarioResult, _Cpu, percentile, run_scenario
from worker.devtools.embedded_redis import RedisServer
from worker.devtools.stack import node_name, start_worker, stop_process, wait_for_workers
from worker.devtools.synthetic import synthetic_events
from worker.engine.checkpoint import Checkpoint, ModelConfig
from worker.store.model_store import Store

__all__ = ["DEFAULT_RTTS", "HostsRow", "parse_rtts", "render_hosts", "run_hosts"]

#: Round trips (ms) of ``itrain bench --rtt-ms`` and of the full run's hosts section.
DEFAULT_RTTS = (0.0, 1.0, 5.0)
#: Workers in each link's run (as ``c2`` and ``latency-4t``).
WORKERS = 2


def parse_rtts(text: str) -> list[float]:
    """``"0,1,5"`` as ``[0.0, 1.0, 5.0]``; ``ConfigurationError`` naming a value that is not a
    round trip in ms (a number >= 0, at most 10 s)."""
    out: list[float] = []
    for part in text.split(","):
        try:
            value = float(part.strip())
        except ValueError:
            raise ConfigurationError(
                f"--rtt-ms: {part.strip()!r} is not a number of milliseconds (e.g. --rtt-ms 0,1,5)"
            ) from None
        if not 0 <= value <= 10_000:
            raise ConfigurationError(f"--rtt-ms: {value:g} is not a round trip in ms (0 to 10,000)")
        out.append(value)
    return list(dict.fromkeys(out))


@dataclass
class HostsRow:
    """One link: ``rtt_ms`` None is ``direct`` (no forwarder). ``many`` and ``step`` are the
    median run of each workload (by events/s, by p99), so every figure of a row comes from one
    real run; the lists hold every round's."""

    link: str
    rtt_ms: float | None
    many: ScenarioResult
    step: ScenarioResult
    #: A PING's round trip through the link, p50 and p99 ms, measured idle before the rounds:
    #: what the link really adds (the forwarder's own time and the machine's scheduling too).
    ping_p50_ms: float | None = None
    ping_p99_ms: float | None = None
    many_events_per_s: list[float] = field(default_factory=list)
    step_p99_ms: list[float] = field(default_factory=list)
    #: Each round's ``train_many`` rate over the 0 ms link's in the same round (paired, so that
    #: the machine's drift between rounds cancels); None without a 0 ms link.
    many_vs_0ms: list[float] = field(default_factory=list)
    #: Requests the workers sent (all their connections), per ``train_many`` critical section
    #: and per ``train_step`` event, in the median runs; None for ``direct``.
    round_trips_per_section: float | None = None
    round_trips_per_step_event: float | None = None


class ForwarderProcess:
    """``python -m worker.devtools.forwarder`` to ``target_port`` with ``delay_ms`` each way."""

    def __init__(self, target_port: int, delay_ms: float) -> None:
        args = ["--target-port", str(target_port), "--delay-ms", repr(delay_ms)]
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "worker.devtools.forwarder", *args],
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line.strip().isdigit():
            self.close()
            raise ConfigurationError(f"the forwarder did not start (it printed {line!r})")
        self.port = int(line)
        self.pid = self.proc.pid

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stats(self) -> dict[str, int]:
        """Its counts so far (it prints them on SIGHUP)."""
        assert self.proc.stdout is not None
        self.proc.send_signal(signal.SIGHUP)
        counts: dict[str, int] = json.loads(self.proc.stdout.readline())
        return counts

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        if self.proc.stdout is not None:
            self.proc.stdout.close()


@dataclass
class _Link:
    """One link's forwarder (none for ``direct``), workers on a queue of its own, and a client
    that sends to that queue."""

    label: str
    rtt_ms: float | None
    fwd: ForwarderProcess | None
    client: TrainingClient
    cpu: _Cpu
    runs: list[tuple[ScenarioResult, int | None]] = field(default_factory=list)
    ping_ms: tuple[float, float] | None = None


def scenarios(quick: bool) -> tuple[Scenario, Scenario]:
    """Each round's two workloads (``rounds`` of each per link)."""
    scale = 0.2 if quick else 1.0
    many = Scenario("many", "train_many, per_event mode", WORKERS, int(100_000 * scale), "many")
    step = Scenario(
        "step",
        "train_step from 4 threads at 1,000 events/s in all",
        WORKERS,
        int(5000 * scale),
        "step",
        rate=1000.0,
        threads=4,
    )
    return many, step


def run_hosts(
    rtts: Sequence[float],
    quick: bool,
    server: RedisServer,
    client: TrainingClient,
    store: Store,
    raw: redis.Redis,
    logs: Path,
    say: Callable[[str], None],
) -> list[HostsRow]:
    """Both workloads over each link (``direct``, then each round trip of ``rtts``), in rounds
    that take the links in turn, each round starting at the next link: the machine's drift (a
    shared machine's load changes by the minute) falls on every link alike."""
    many, step = scenarios(quick)
    rounds = 2 if quick else 3
    with ExitStack() as stack:
        links = [_start_link(stack, i, rtt, server, client, logs) for i, rtt in enumerate([None, *rtts])]
        for link in links:
            _warm_up(link.client, store, raw)
            link.ping_ms = _ping(link.fwd.url if link.fwd else server.url)
        for r in range(rounds):
            order = links[r % len(links) :] + links[: r % len(links)]
            for sc in (many, step):
                for link in order:
                    say(f"hosts round {r + 1}/{rounds}, {link.label}: {sc.description}, {sc.events} events")
                    before = link.fwd.stats() if link.fwd else None
                    result = run_scenario(sc, link.client, store, raw, link.cpu)
                    after = link.fwd.stats() if link.fwd else None
                    result.key = f"{sc.key}@{link.label}"
                    trips = after["round_trips"] - before["round_trips"] if after and before else None
                    link.runs.append((result, trips))
        return _rows(links)


def _start_link(
    stack: ExitStack, index: int, rtt: float | None, server: RedisServer, client: TrainingClient, logs: Path
) -> _Link:
    label = "direct" if rtt is None else f"{rtt:g} ms"
    fwd = None if rtt is None else stack.enter_context(_forwarder(server, rtt))
    queue = f"itrain-hosts-{index}"
    env = {
        "ITRAIN_REDIS_URL": fwd.url if fwd else server.url,
        "ITRAIN_RECORD_TIMINGS": "1",
        "ITRAIN_QUEUE": queue,
    }
    names = [f"hosts{index}w{k + 1}-{uuid.uuid4().hex[:4]}" for k in range(WORKERS)]
    worker_logs = [logs / f"bench-hosts{index}-worker{k + 1}.log" for k in range(WORKERS)]
    procs = [
        start_worker(name, env, concurrency=1, loglevel="warning", log=log, app=naive.APP)
        for name, log in zip(names, worker_logs, strict=True)
    ]
    for p in procs:
        stack.callback(stop_process, p)
    wait_for_workers(
        client.app, names=[node_name(n) for n in names], procs=procs, logs=worker_logs, timeout=120
    )
    sender = stack.enter_context(TrainingClient(settings=client.settings.model_copy(update={"queue": queue})))
    assert server.proc is not None
    cpu = _Cpu(server.proc.pid, procs)
    if fwd is not None:
        cpu.kinds["forwarder"] = [fwd.pid]
    return _Link(label, rtt, fwd, sender, cpu)


@contextmanager
def _forwarder(server: RedisServer, rtt_ms: float) -> Iterator[ForwarderProcess]:
    fwd = ForwarderProcess(server.port, rtt_ms / 2)
    try:
        yield fwd
    finally:
        fwd.close()


def _median_run(
    runs: list[tuple[ScenarioResult, int | None]], key: Callable[[ScenarioResult], float]
) -> tuple[ScenarioResult, int | None]:
    ordered = sorted(runs, key=lambda run: key(run[0]))
    return ordered[(len(ordered) - 1) // 2]


def _rows(links: list[_Link]) -> list[HostsRow]:
    base = next((link for link in links if link.rtt_ms == 0), None)
    rows = []
    for link in links:
        many_runs = [run for run in link.runs if run[0].key.startswith("many@")]
        step_runs = [run for run in link.runs if run[0].key.startswith("step@")]
        many, many_trips = _median_run(many_runs, lambda r: r.events_per_s)
        step, step_trips = _median_run(step_runs, lambda r: r.latency_p99_ms)
        paired: list[float] = []
        if base is not None:
            base_many = [run for run in base.runs if run[0].key.startswith("many@")]
            paired = [
                round(ours.events_per_s / theirs.events_per_s, 3)
                for (ours, _), (theirs, _) in zip(many_runs, base_many, strict=True)
            ]
        rows.append(
            HostsRow(
                link=link.label,
                rtt_ms=link.rtt_ms,
                many=many,
                step=step,
                ping_p50_ms=link.ping_ms[0] if link.ping_ms else None,
                ping_p99_ms=link.ping_ms[1] if link.ping_ms else None,
                many_events_per_s=[r.events_per_s for r, _ in many_runs],
                step_p99_ms=[r.latency_p99_ms for r, _ in step_runs],
                many_vs_0ms=paired,
                round_trips_per_section=round(many_trips / many.critical_sections, 1)
                if many_trips is not None and many.critical_sections
                else None,
                round_trips_per_step_event=round(step_trips / step.events, 2)
                if step_trips is not None
                else None,
            )
        )
    return rows


def _ping(url: str, n: int = 300) -> tuple[float, float]:
    """p50 and p99 of ``n`` PINGs' round trips through ``url``, in ms."""
    client = redis.Redis.from_url(url, socket_timeout=10)
    try:
        client.ping()
        times = []
        for _ in range(n):
            start = time.perf_counter()
            client.ping()
            times.append((time.perf_counter() - start) * 1000)
    finally:
        client.close()
    return round(percentile(times, 50), 3), round(percentile(times, 99), 3)


def _warm_up(client: TrainingClient, store: Store, raw: redis.Redis) -> None:
    """A few batches first, so that no link pays the workers' first-batch costs in its figures."""
    model = f"bench-warm-{uuid.uuid4().hex[:8]}"
    store.create(model, Checkpoint.initial(ModelConfig()), force=False)
    events = synthetic_events(2000, users=100, model=model, seed=3)
    client.wait_all(client.train_many(events), timeout=120)
    client.wait_all([client.train_step(e) for e in events[:50]], timeout=120)


def _median(values: Sequence[float]) -> float | None:
    return float(statistics.median(values)) if values else None


def report(rows: Sequence[HostsRow]) -> dict[str, Any]:
    """The JSON of the section: every link's median runs and rounds, and the median of its
    paired ``train_many`` ratios to the 0 ms link."""
    out = []
    for r in rows:
        entry = asdict(r)
        entry["many_vs_0ms_median"] = _median(r.many_vs_0ms)
        out.append(entry)
    return {"links": out}


def render_hosts(rows: Sequence[HostsRow]) -> Table:
    rounds = max((len(r.many_events_per_s) for r in rows), default=0)
    table = Table(
        title=f"hosts: {WORKERS} workers reach Redis through a forwarder, X/2 ms each way "
        f"(the producer beside Redis); median of {rounds} rounds",
        caption="many: train_many, per_event mode; step: train_step from 4 threads at 1,000 events/s in "
        "all; vs 0 ms: median of each round's ratio; CPU µs/event producer/redis/main/pool "
        "(+forwarder); trips: the workers' requests (round trips)",
    )
    columns = (
        "link",
        "PING p50/p99 ms",
        "many events/s (rounds)",
        "vs 0 ms",
        "many lock hold p50/p99 ms",
        "many CPU µs/event",
        "trips/section",
        "step p50/p99 ms",
        "step lock hold p50/p99 ms",
        "step CPU µs/event",
        "trips/event",
    )
    for col in columns:
        table.add_column(col, justify="left" if col == "link" else "right")

    def pair(a: float | None, b: float | None) -> str:
        return "-" if a is None or b is None else f"{a:.2f}/{b:.2f}"

    def cpu(r: ScenarioResult) -> str:
        c = r.cpu_us_per_event
        text = "/".join(f"{c.get(k, 0):.1f}" for k in ("producer", "redis", "worker_main", "pool"))
        return text + (f" (+{c['forwarder']:.1f})" if "forwarder" in c else "")

    for r in rows:
        ratio = _median(r.many_vs_0ms)
        table.add_row(
            r.link,
            pair(r.ping_p50_ms, r.ping_p99_ms),
            f"{r.many.events_per_s:,.0f} ({', '.join(f'{x:,.0f}' for x in r.many_events_per_s)})",
            "-" if ratio is None else f"{ratio:.2f}",
            pair(r.many.lock_hold_p50_ms, r.many.lock_hold_p99_ms),
            cpu(r.many),
            "-" if r.round_trips_per_section is None else f"{r.round_trips_per_section:.1f}",
            pair(r.step.latency_p50_ms, r.step.latency_p99_ms),
            pair(r.step.lock_hold_p50_ms, r.step.lock_hold_p99_ms),
            cpu(r.step),
            "-" if r.round_trips_per_step_event is None else f"{r.round_trips_per_step_event:.2f}",
        )
    return table
