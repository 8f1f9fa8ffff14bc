"""The producer's cost of routing: ``train_many`` and ``train_step`` pushes, no workers.

``python -m worker.devtools.route_cost --redis-url URL [--routed]`` sends 100,000 events with
``train_many`` and 5,000 ``train_step`` calls, five times each (the best kept), half of them for
model ``a`` and half for ``b``; with ``--routed``, ``a`` has a queue of its own (``<queue>.a``),
so every ``train_many`` is a two-queue ``MULTI``. It prints the client's CPU and wall time per
event as JSON. It deletes its queues and ``itrain:routes`` on that Redis: point it at a Redis of
its own (e.g. ``redis-server --port 6390 --save ''``). Run it beside an older checkout
(``PYTHONPATH=<checkout> python worker/devtools/route_cost.py``, without ``--routed``: it
imports only ``producer``) for the cost before routes.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

import redis

from producer.client import TrainingClient
from producer.keys import ROUTES
from producer.settings import Settings

__all__ = ["main"]


def _events(n: int, tag: str) -> list[dict[str, Any]]:
    return [
        {
            "event_id": f"{tag}-{i}",
            "user_id": f"u{i % 101}",
            "action_type": "click",
            "timestamp": 1_700_000_000 + i,
            "model": "a" if i % 2 else "b",
        }
        for i in range(n)
    ]


def _best(runs: list[tuple[float, float]]) -> dict[str, float]:
    wall, cpu = min(runs, key=lambda r: r[1])
    return {"wall_us": round(wall, 2), "cpu_us": round(cpu, 2)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--redis-url", required=True)
    parser.add_argument("--routed", action="store_true", help="model a on a queue of its own")
    args = parser.parse_args(argv)
    settings = Settings(redis_url=args.redis_url)
    queue, own = settings.queue, f"{settings.queue}.a"
    admin = redis.Redis.from_url(args.redis_url)
    admin.delete(ROUTES, queue, own)
    if args.routed:
        admin.hset(ROUTES, "a", own)
    figures: dict[str, Any] = {"routed": args.routed}
    with TrainingClient(settings=settings) as client:

        def many(events: list[dict[str, Any]]) -> None:
            client.train_many(events, result=False)

        def steps(events: list[dict[str, Any]]) -> None:
            for event in events:
                client.train_step(event, result=False)

        plan: list[tuple[str, int, Callable[[list[dict[str, Any]]], None]]] = [
            ("train_many", 100_000, many),
            ("train_step", 5_000, steps),
        ]
        for name, n, send in plan:
            runs = []
            for rep in range(5):
                events = _events(n, f"{name}-{rep}")
                admin.delete(queue, own)
                wall, cpu = time.perf_counter(), time.process_time()
                send(events)
                runs.append(((time.perf_counter() - wall) / n * 1e6, (time.process_time() - cpu) / n * 1e6))
            figures[name] = _best(runs)
        figures["queued"] = {queue: admin.llen(queue), own: admin.llen(own)}
    admin.delete(ROUTES, queue, own)
    admin.close()
    print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
