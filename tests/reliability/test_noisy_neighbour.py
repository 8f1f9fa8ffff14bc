"""The noisy neighbour: model A's queue flooded, model B's lone events still served in time.

A worker consumes ``ITRAIN_QUEUES=itrain.a,itrain.b``. B's ``train_step`` latency is measured
first with B's queue alone (A's empty), then while A's queue is kept backlogged by a
``train_many`` flood: B's p99 must stay within 3x its unloaded p99 or 50 ms, whichever is larger,
and every one of A's events must train. Real redis-server, real ``celery -A worker worker``.

The flood's size: while B is active the flood gets one of the worker's two pool processes
(``worker.consume.turns``), which drains 5,000-15,000 events/s on 2 shared cores depending on
their load: a fixed 150,000 events outlasted B's 10 s on a busy machine and not on a quiet one.
So A's producer pushes ``NOISY_EVENTS`` (60,000) first, then ``TOP_UP`` more whenever fewer than
``LOW`` messages wait, until B's calls are over, as a real flood would: the backlog lasts
whatever the machine, and the total trained is what it took (reported). The test asserts that
the backlog lasted through B's calls, not any rate. A's producer is a process of its own, as
another service's would be (its large pushes would otherwise hold B's process's GIL), and it
encodes its top-ups (``train_many``'s messages, ``READY_TOP_UPS`` of them) before B's loaded calls
start: another service encodes on its own host, while this one shares the worker's 2 cores, and
encoding 30,000 events takes ~0.3-0.5 s of a core. Encoding them meanwhile, in bursts every second
or so, put a second CPU hog beside the worker whenever the machine had one already: under one
hog, half to 85% of B's calls over 40 ms came during those bursts, which cover a quarter of the
time. What reaches Redis is unchanged: each top-up is one ``LPUSH`` of the messages
``train_many`` would push. For the same reason A's producer runs at the lowest CPU priority
(``nice 19``): beside one CPU-bound process outside the test, B's loaded p99 was 175 ms in one run
without it, and 32, 237, 51 and 34 ms in four runs with it (unloaded: 11.6-17.7 ms); a machine
that busy can still fail the bound, since B's worker shares the cores with the flood's training.
"""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
import redis

from producer.client import TrainingClient
from producer.keys import ModelKeys
from producer.settings import Settings
from tests.conftest import ROOT, ClientFactory, ModelFactory, WorkerFactory
from tests.helpers import Workers, make_events, model_state, wait_until

QUEUE_A, QUEUE_B = "itrain.a", "itrain.b"
NOISY_EVENTS = int(os.environ.get("ITRAIN_NOISY_EVENTS", "60000"))
TOP_UP = 30_000
#: Top-ups encoded before B's loaded calls start (more are encoded on the way if they run out).
READY_TOP_UPS = 16
#: A's queue gets another ``TOP_UP`` when fewer than this many messages (256 events each) wait.
LOW = 120
RATE = 50.0  # B's calls a second, each sent without waiting for the previous
UNLOADED_CALLS = 250
LOADED_CALLS = 500
#: A's backlog must outlast B's loaded calls by this much at least.
BACKLOG_SECONDS = LOADED_CALLS / RATE


@dataclass
class Latencies:
    """Sends B's calls at a fixed rate from one thread; the caller polls their results."""

    client: TrainingClient
    model: str
    tag: str
    calls: int
    sent: list[tuple[Any, float]] = field(default_factory=list)
    done: dict[int, float] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def send(self) -> None:
        events = make_events(self.model, self.calls, self.tag)
        start = time.perf_counter()
        for i, event in enumerate(events):
            delay = start + i / RATE - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            sent_at = time.perf_counter()
            handle = self.client.train_step(event)
            with self.lock:
                self.sent.append((handle, sent_at))

    def poll(self, results: redis.Redis) -> None:
        """Record when each sent call's result appeared."""
        with self.lock:
            pending = [(i, h) for i, (h, _) in enumerate(self.sent) if i not in self.done]
        if not pending:
            return
        values = results.mget([h.key for _, h in pending])
        now = time.perf_counter()
        for (i, _), value in zip(pending, values, strict=True):
            if value is not None:
                self.done[i] = now

    def seconds(self) -> list[float]:
        return [self.done[i] - sent_at for i, (_, sent_at) in enumerate(self.sent)]


def _run_calls(calls: Latencies, on_poll: Any = None, timeout: float = 120.0) -> list[float]:
    sender = threading.Thread(target=calls.send, daemon=True)
    sender.start()
    results = calls.client._results
    deadline = time.monotonic() + timeout
    while sender.is_alive() or len(calls.done) < calls.calls:
        assert time.monotonic() < deadline, f"{len(calls.done)} of {calls.calls} results in {timeout:g} s"
        calls.poll(results)
        if on_poll is not None:
            on_poll()
        time.sleep(0.005)
    sender.join()
    return calls.seconds()


@dataclass
class Flood:
    """A's producer: ``train_many`` pushes that keep A's queue backlogged until stopped. It runs
    in a process of its own (``python -m tests.reliability.test_noisy_neighbour URL MODEL``), as
    another service's producer would: in B's process its large pushes would hold the GIL and
    delay B's own calls, which is not what the test measures. Its top-ups are encoded ahead
    (``prepare``), as another host would encode them: see the module's docstring."""

    client: TrainingClient
    redis: redis.Redis
    model: str
    events: int = 0
    pushes: int = 0
    encoded: int = 0
    ready: deque[tuple[Any, list[str]]] = field(default_factory=deque)
    stop: threading.Event = field(default_factory=threading.Event)

    def encode(self, n: int) -> tuple[Any, list[str]]:
        """``train_many``'s messages for A's next ``n`` events, and their ids."""
        events = make_events(self.model, n, "flood", start=self.encoded)
        self.client._fresh_routes()
        pushes, _, event_ids = self.client._outgoing.many(events, result=True)
        self.encoded += n
        return pushes, event_ids

    def prepare(self, top_ups: int) -> None:
        self.ready.extend(self.encode(TOP_UP) for _ in range(top_ups))

    def push(self, n: int = TOP_UP) -> None:
        """Push ``n`` events, as ``train_many`` does (one ``LPUSH``); a top-up encoded ahead when
        one is left."""
        pushes, event_ids = self.ready.popleft() if n == TOP_UP and self.ready else self.encode(n)
        self.client._push(pushes, event_ids)
        self.events += len(event_ids)
        self.pushes += 1

    def keep_backlogged(self) -> None:
        while not self.stop.is_set():
            if self.redis.llen(QUEUE_A) < LOW:
                self.push(TOP_UP)
            else:
                self.stop.wait(0.05)


def _flood_process(redis_url: str, model: str) -> None:
    """The flood's process: the first push, a line ``ready``, top-ups until its stdin closes,
    then a line ``<events> <pushes>``."""
    with TrainingClient(settings=Settings(redis_url=redis_url, queue=QUEUE_A)) as client:
        flood = Flood(client, redis.Redis.from_url(redis_url), model)
        first = flood.encode(NOISY_EVENTS)
        flood.prepare(READY_TOP_UPS)
        client._push(*first)
        flood.events, flood.pushes = NOISY_EVENTS, 1
        print("ready", flush=True)
        threading.Thread(target=lambda: (sys.stdin.read(), flood.stop.set()), daemon=True).start()
        flood.keep_backlogged()
        print(flood.events, flood.pushes, flush=True)


def _p99_ms(seconds: list[float]) -> float:
    return float(np.percentile(np.array(seconds) * 1000, 99))


@pytest.mark.alone
def test_a_flooded_queue_leaves_another_queues_latency_within_bounds(
    redis_url: str,
    redis_client: redis.Redis,
    start_workers: WorkerFactory,
    workers: Workers,
    make_model: ModelFactory,
    make_client: ClientFactory,
) -> None:
    # Given a worker (two pool processes) on A's and B's queues, and a client for each queue
    redis_client.delete(QUEUE_A, QUEUE_B)
    model_a, model_b = make_model(), make_model()
    start_workers(1, concurrency=2, env={"ITRAIN_QUEUES": f"{QUEUE_A},{QUEUE_B}"})
    on_b = make_client(redis_url, queue=QUEUE_B)

    # When B's calls come at 50/s with B's queue alone
    unloaded = _run_calls(Latencies(on_b, model_b, "alone", UNLOADED_CALLS))
    unloaded_p99 = _p99_ms(unloaded)

    # And then A's queue is flooded and kept backlogged (by A's producer, a process of its own),
    # and B's calls come again at 50/s
    feeder = subprocess.Popen(
        [sys.executable, "-m", "tests.reliability.test_noisy_neighbour", redis_url, model_a],
        cwd=ROOT,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: os.nice(19),  # (another host's, in a real deployment)
    )
    try:
        assert feeder.stdout is not None
        assert feeder.stdout.readline().strip() == "ready", "A's producer did not start"
        pushed_at = time.monotonic()  # the first push is just done (its top-ups encoded before it)
        backlog: list[tuple[float, int]] = []

        def sample() -> None:
            if not backlog or time.monotonic() - backlog[-1][0] >= 0.1:
                backlog.append((time.monotonic(), int(redis_client.llen(QUEUE_A))))

        loaded_from = time.monotonic()
        loaded = _run_calls(Latencies(on_b, model_b, "loaded", LOADED_CALLS), on_poll=sample)
        loaded_until = time.monotonic()
        out, _ = feeder.communicate("", timeout=120)
    finally:
        if feeder.poll() is None:
            feeder.kill()
    events, pushes = (int(x) for x in out.split())
    loaded_p99 = _p99_ms(loaded)
    drained = time.monotonic()
    while redis_client.llen(QUEUE_A):
        time.sleep(0.05)
        drained = time.monotonic()
    bound = max(3 * unloaded_p99, 50.0)
    print(
        f"\nB unloaded: p50 {np.median(unloaded) * 1000:.1f} ms, p99 {unloaded_p99:.1f} ms "
        f"({UNLOADED_CALLS} calls at {RATE:g}/s)"
        f"\nB with A flooded: p50 {np.median(loaded) * 1000:.1f} ms, p99 {loaded_p99:.1f} ms, "
        f"max {max(loaded) * 1000:.1f} ms ({LOADED_CALLS} calls over {loaded_until - loaded_from:.1f} s); "
        f"bound {bound:.1f} ms"
        f"\nA: {events} events in {pushes} pushes, queue backlogged "
        f"{drained - pushed_at:.1f} s after the first push, "
        f"smallest backlog while B was measured: {min(n for _, n in backlog)} messages"
    )
    # Then A's queue was backlogged all the while B's calls were measured (>= 10 s)
    assert loaded_until - loaded_from >= BACKLOG_SECONDS - 0.5
    assert all(n > 0 for _, n in backlog), "A's queue drained before B's calls were over"
    # And B's p99 stayed within 3x its unloaded p99 or 50 ms, whichever is larger
    assert loaded_p99 <= bound, (loaded_p99, unloaded_p99)
    # And every one of A's events trained, each once (the step counts events trained, and the
    # markers let no event train twice), and none failed
    wait_until(lambda: model_state(redis_client, model_a)["step"] >= events, 180, "A's events trained")
    assert model_state(redis_client, model_a)["step"] == events
    assert int(redis_client.llen(ModelKeys(model_a).dead)) == 0
    assert model_state(redis_client, model_b)["step"] == UNLOADED_CALLS + LOADED_CALLS


if __name__ == "__main__":
    _flood_process(sys.argv[1], sys.argv[2])
