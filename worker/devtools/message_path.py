"""The cost of the message path: a queue of ``train_step`` messages drained by one worker process.

What the message path costs is the worker's main process (Celery's consumer: fetching, acking,
task events, the micro-batching strategy); the pool process trains. This scenario pushes
``n`` ``itrain.train_step`` envelopes onto the queue in one pipeline, lets one worker
(``--concurrency 1``, task events on, as in production) drain them, and reads both processes'
CPU time from ``/proc`` before and after: CPU per message in the main process, in the pool, and
messages/s from the first push to the last result.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import redis

from producer.client import TrainingClient
from producer.protocol import TASK_TRAIN_STEP, encode_envelope, new_task_id, result_key
from worker.devtools.stack import start_worker, stop_process, wait_for_workers
from worker.devtools.synthetic import synthetic_events

__all__ = ["MessagePathResult", "child_pids", "cpu_seconds", "drain"]

_TICK = os.sysconf("SC_CLK_TCK")


@dataclass
class MessagePathResult:
    transport: str
    messages: int
    seconds: float
    messages_per_s: float
    main_cpu_us_per_message: float
    pool_cpu_us_per_message: float


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time of one process (not its children), from ``/proc``."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (a worker's pool processes), from ``/proc``."""
    out: list[int] = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        out += [int(c) for c in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
    return out


def drain(
    label: str,
    app: str,
    model: str,
    n: int,
    env: dict[str, str],
    client: TrainingClient,
    raw: redis.Redis,
    logs: Path,
) -> MessagePathResult:
    """One worker of ``app`` drains ``n`` pre-pushed ``train_step`` messages of ``model``."""
    queue = f"itrain-drain-{uuid.uuid4().hex[:6]}"
    log = logs / f"drain-{label}.log"
    proc = start_worker(
        f"drain-{label}-{uuid.uuid4().hex[:4]}",
        {**env, "ITRAIN_QUEUE": queue},
        concurrency=1,
        loglevel="warning",
        log=log,
        app=app,
    )
    try:
        wait_for_workers(client.app, 1, procs=[proc], logs=[log], timeout=120)
        time.sleep(1.0)  # let start-up work settle before the CPU baseline
        events = synthetic_events(n, users=10_000, model=model, seed=11)
        ids = [new_task_id() for _ in events]
        envelopes = [
            encode_envelope(TASK_TRAIN_STEP, i, [e], queue) for i, e in zip(ids, events, strict=True)
        ]
        pids = [proc.pid, *child_pids(proc.pid)]
        before = [cpu_seconds(p) for p in pids]
        start = time.monotonic()
        pipe = raw.pipeline(transaction=False)
        for k in range(0, n, 1000):
            pipe.lpush(queue, *envelopes[k : k + 1000])
        pipe.execute()
        deadline = start + max(120.0, n / 100)
        pending = ids
        while pending:
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"{label}: {len(pending)} result(s) missing after {deadline - start:.0f} s"
                )
            # One pool process trains the micro-batches in order: poll the last, then check all.
            if raw.exists(result_key(pending[-1])):
                found = [
                    v is not None
                    for k in range(0, len(pending), 5000)
                    for v in raw.mget([result_key(i) for i in pending[k : k + 5000]])
                ]
                pending = [i for i, ok in zip(pending, found, strict=True) if not ok]
            else:
                time.sleep(0.01)
        seconds = time.monotonic() - start
        after = [cpu_seconds(p) for p in pids]
        main = after[0] - before[0]
        pool = sum(after[1:]) - sum(before[1:])
        return MessagePathResult(
            transport=label,
            messages=n,
            seconds=round(seconds, 3),
            messages_per_s=round(n / seconds, 1),
            main_cpu_us_per_message=round(main / n * 1e6, 1),
            pool_cpu_us_per_message=round(pool / n * 1e6, 1),
        )
    finally:
        stop_process(proc)
