"""Production workers register production tasks only; the benchmark's naive baseline exists only
in the benchmark's own workers (``celery -A worker.devtools.naive worker``).

``worker.devtools.naive`` is imported inside the tests, never at collection: importing it builds
the worker's Celery app, which must read the private Redis's URL, set by the ``redis_url`` fixture.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import redis

from producer.client import TrainingClient
from producer.protocol import TASK_TRAIN_BATCH, TASK_TRAIN_STEP
from tests.helpers import Workers, make_event
from worker.devtools.stack import worker_command
from worker.engine.checkpoint import ModelConfig

PRODUCTION_TASKS = {"itrain.train_step", "itrain.train_batch", "itrain.predict"}
NAIVE_APP, TASK_NAIVE = "worker.devtools.naive", "itrain.bench_naive_step"


def _registered(client: TrainingClient, workers: Workers, proc: subprocess.Popen[bytes]) -> set[str]:
    node = workers.names[proc.pid]
    replies = client.app.control.inspect(destination=[node], timeout=5.0).registered() or {}
    assert node in replies, f"{node} did not answer `inspect registered`: {replies}"
    return set(replies[node])


def test_production_worker_registers_production_tasks_only(
    redis_url: str, workers: Workers, client: TrainingClient
) -> None:
    # Given a worker started as users start it: celery -A worker worker
    (proc,) = workers.start(1, redis_url=redis_url)
    # When asked which tasks it runs (celery.* builtins left out by Celery)
    registered = _registered(client, workers, proc)
    # Then exactly the production tasks, and no benchmark task
    assert registered == PRODUCTION_TASKS
    assert TASK_NAIVE not in registered
    assert {TASK_TRAIN_STEP, TASK_TRAIN_BATCH} <= registered


def test_production_app_registry_holds_production_tasks_only(redis_url: str) -> None:
    # Given the app a worker process loads (what `celery -A worker` finds), its includes imported
    # in a fresh interpreter, so no module of this test session is in it
    code = (
        "import json, worker\n"
        "app = worker.app\n"
        "app.loader.import_default_modules()\n"
        "print(json.dumps(sorted(app.tasks)))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        env={**os.environ, "ITRAIN_REDIS_URL": redis_url},
    ).stdout
    names = set(json.loads(out))
    # Then only the production tasks besides Celery's own
    assert {n for n in names if not n.startswith("celery.")} == PRODUCTION_TASKS


def test_worker_command_uses_the_production_app_unless_told() -> None:
    assert worker_command("w", 1)[3:5] == ["-A", "worker"]
    assert worker_command("w", 1, app=NAIVE_APP)[3:5] == ["-A", NAIVE_APP]


def test_benchmark_worker_runs_the_naive_task_and_the_production_tasks(
    redis_url: str, workers: Workers, client: TrainingClient, make_model, redis_client: redis.Redis
) -> None:
    from worker.devtools import naive

    assert (naive.APP, naive.TASK_NAIVE) == (NAIVE_APP, TASK_NAIVE)
    # Given a worker of the benchmark's app, and a model for both designs
    (proc,) = workers.start(1, redis_url=redis_url, app=naive.APP)
    model = make_model()
    naive.naive_init(redis_client, model, ModelConfig())
    # Then it registers the naive task besides the production ones
    assert _registered(client, workers, proc) == PRODUCTION_TASKS | {naive.TASK_NAIVE}
    # And it trains through both
    naive_result = client.app.send_task(naive.TASK_NAIVE, args=[make_event(model, 0)]).get(timeout=60)
    assert naive_result["status"] == "trained"
    assert client.train_step(make_event(model, 1)).get(timeout=60)["status"] == "trained"
