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
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import redis
from rich.table import Table

from producer.client import TrainingClient
from producer.errors import ConfigurationError
from worker.devtools.bench import Scenario, ScenarioResult, _Cpu, _workers, run_scenario
from worker.devtools.embedded_redis import RedisServer
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
    """One link: ``rtt_ms`` None is ``direct`` (no forwarder)."""

    link: str
    rtt_ms: float | None
    many: ScenarioResult
    step: ScenarioResult
    #: Requests the workers sent (all their connections), per ``train_many`` critical section
    #: and per ``train_step`` event; None for ``direct``.
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


@contextmanager
def _link(server: RedisServer, rtt_ms: float | None) -> Iterator[ForwarderProcess | None]:
    if rtt_ms is None:
        yield None
        return
    fwd = ForwarderProcess(server.port, rtt_ms / 2)
    try:
        yield fwd
    finally:
        fwd.close()


def scenarios(quick: bool) -> tuple[Scenario, Scenario]:
    scale = 0.2 if quick else 1.0
    many = Scenario("many", "train_many, per_event mode", WORKERS, int(200_000 * scale), "many")
    step = Scenario(
        "step",
        "train_step from 4 threads at 1,000 events/s in all",
        WORKERS,
        int(8000 * scale),
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
    """Both workloads over each link: ``direct``, then each round trip of ``rtts``."""
    many, step = scenarios(quick)
    rows = []
    for rtt in [None, *rtts]:
        label = "direct" if rtt is None else f"{rtt:g} ms"
        with _link(server, rtt) as fwd:
            env = {"ITRAIN_REDIS_URL": fwd.url if fwd else server.url, "ITRAIN_RECORD_TIMINGS": "1"}
            with _workers(WORKERS, env, client, logs) as procs:
                assert server.proc is not None
                cpu = _Cpu(server.proc.pid, procs)
                if fwd is not None:
                    cpu.kinds["forwarder"] = [fwd.pid]
                _warm_up(client, store, raw)
                results = []
                for sc in (many, step):
                    say(f"hosts {label}: {sc.description}, {sc.events} events")
                    before = fwd.stats() if fwd else None
                    result = run_scenario(sc, client, store, raw, cpu)
                    after = fwd.stats() if fwd else None
                    result.key = f"{sc.key}@{label}"
                    trips = after["round_trips"] - before["round_trips"] if after and before else None
                    results.append((result, trips))
        (m, m_trips), (s, s_trips) = results
        rows.append(
            HostsRow(
                link=label,
                rtt_ms=rtt,
                many=m,
                step=s,
                round_trips_per_section=round(m_trips / m.critical_sections, 1)
                if m_trips is not None and m.critical_sections
                else None,
                round_trips_per_step_event=round(s_trips / s.events, 2) if s_trips is not None else None,
            )
        )
    return rows


def _warm_up(client: TrainingClient, store: Store, raw: redis.Redis) -> None:
    """A few batches first, so that no link pays the workers' first-batch costs in its figures."""
    model = f"bench-warm-{uuid.uuid4().hex[:8]}"
    store.create(model, Checkpoint.initial(ModelConfig()), force=False)
    events = synthetic_events(2000, users=100, model=model, seed=3)
    client.wait_all(client.train_many(events), timeout=120)
    client.wait_all([client.train_step(e) for e in events[:50]], timeout=120)


def report(rows: Sequence[HostsRow]) -> dict[str, Any]:
    """The JSON of the section, with each link's ``train_many`` rate over the 0 ms one's."""
    base = next((r for r in rows if r.rtt_ms == 0), None)
    out = []
    for r in rows:
        entry = asdict(r)
        if base is not None:
            entry["many_rate_vs_0ms"] = round(r.many.events_per_s / base.many.events_per_s, 3)
        out.append(entry)
    return {"links": out}


def render_hosts(rows: Sequence[HostsRow]) -> Table:
    base = next((r for r in rows if r.rtt_ms == 0), None)
    table = Table(
        title=f"hosts: {WORKERS} workers reach Redis through a forwarder, X/2 ms each way "
        "(the producer beside Redis)",
        caption="many: train_many, per_event mode; step: train_step from 4 threads at 1,000 events/s; "
        "CPU µs/event producer/redis/main/pool (+forwarder); trips: the workers' requests",
    )
    columns = (
        "link",
        "many events/s",
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
        table.add_row(
            r.link,
            f"{r.many.events_per_s:,.0f}",
            "-" if base is None else f"{r.many.events_per_s / base.many.events_per_s:.2f}",
            pair(r.many.lock_hold_p50_ms, r.many.lock_hold_p99_ms),
            cpu(r.many),
            "-" if r.round_trips_per_section is None else f"{r.round_trips_per_section:.1f}",
            pair(r.step.latency_p50_ms, r.step.latency_p99_ms),
            pair(r.step.lock_hold_p50_ms, r.step.lock_hold_p99_ms),
            cpu(r.step),
            "-" if r.round_trips_per_step_event is None else f"{r.round_trips_per_step_event:.2f}",
        )
    return table
