"""``itrain bench --rtt-ms``: its argument checked before anything starts, the forwarder process it
runs in front of Redis, and the section's figures (median runs, paired ratios to the 0 ms link)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import redis

from worker.devtools.bench import ScenarioResult
from worker.devtools.embedded_redis import RedisServer
from worker.devtools.hosts import ForwarderProcess, _Link, _rows, parse_rtts, render_hosts, report

ITRAIN = str(Path(sys.executable).with_name("itrain"))


@pytest.mark.parametrize(
    ("value", "named"), [("1,x", "'x' is not a number"), ("-1", "-1 is not a round trip"), ("1,,5", "''")]
)
def test_a_bad_round_trip_is_refused_before_anything_starts(value: str, named: str) -> None:
    done = subprocess.run(
        [ITRAIN, "bench", f"--rtt-ms={value}"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.startswith("itrain: --rtt-ms: ")
    assert named in done.stderr
    assert len(done.stderr.splitlines()) == 1


def test_round_trips_parse_in_order_once_each() -> None:
    assert parse_rtts("0, 1,5,1") == [0.0, 1.0, 5.0]


def test_the_forwarder_process_delays_and_counts() -> None:
    with RedisServer() as server:
        fwd = ForwarderProcess(server.port, 5.0)
        try:
            client = redis.Redis.from_url(fwd.url, socket_timeout=10)
            client.ping()
            before = fwd.stats()["round_trips"]
            for _ in range(3):
                client.ping()
            assert fwd.stats()["round_trips"] - before == 3
            client.close()
        finally:
            fwd.close()
        assert fwd.proc.returncode == 0


def _result(key: str, rate: float, p99: float = 10.0) -> ScenarioResult:
    return ScenarioResult(
        key=key, description="", workers=2, events=1000, seconds=1000 / rate, events_per_s=rate,
        latency_p50_ms=p99 / 2, latency_p99_ms=p99, lock_wait_p50_ms=0.1, lock_wait_p99_ms=0.2,
        lock_hold_p50_ms=1.0, lock_hold_p99_ms=2.0, critical_sections=10,
        cpu_us_per_event={"producer": 1.0, "redis": 1.0, "worker_main": 1.0, "pool": 1.0, "forwarder": 0.5},
    )  # fmt: skip


def _link(label: str, rtt: float | None, rates: list[float], p99s: list[float]) -> _Link:
    link = _Link(label, rtt, None, None, None)  # type: ignore[arg-type]
    for rate in rates:
        link.runs.append((_result(f"many@{label}", rate), 40))
    for p99 in p99s:
        link.runs.append((_result(f"step@{label}", 1000, p99), 1500))
    return link


def test_a_row_is_the_median_run_and_the_ratio_is_paired_by_round() -> None:
    # Given three rounds over two links, the machine slower in the second round
    base = _link("0 ms", 0.0, [20_000, 10_000, 21_000], [12, 30, 11])
    far = _link("1 ms", 1.0, [19_000, 9_000, 19_950], [14, 33, 13])
    # When the rows are made
    rows = _rows([base, far])
    # Then each row's figures come from its median run and its ratio pairs the rounds
    assert rows[1].many.events_per_s == 19_000
    assert rows[1].step.latency_p99_ms == 14
    assert rows[1].many_vs_0ms == [0.95, 0.9, 0.95]
    assert report(rows)["links"][1]["many_vs_0ms_median"] == 0.95
    assert rows[1].round_trips_per_section == 4.0
    assert rows[1].round_trips_per_step_event == 1.5
    assert render_hosts(rows).row_count == 2
