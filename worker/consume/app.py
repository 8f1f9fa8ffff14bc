"""The worker's Celery app: ``celery -A worker worker`` and ``celery -A worker flower`` find it."""

from __future__ import annotations

import gc
import logging
import os
import sys
import time
from typing import Any

# One BLAS thread per pool process: the matrices are tiny, and several processes each starting
# a thread per core only fight over the cores (a 4096-wide step took 4x longer).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from celery.signals import celeryd_after_setup, worker_init
from kombu import Queue  # type: ignore[attr-defined]

from producer.celery_config import make_celery
from producer.errors import ConfigurationError
from producer.sentinel import is_sentinel_url, parse_sentinel_url
from producer.server_version import check_server_versions
from producer.settings import get_settings
from worker.consume.flower_sentinels import FLOWER_POOL, any_sentinel_pool
from worker.consume.queue_heads import QueueHeadsStep
from worker.consume.sentinel_transport import AMQP_CLASS, transport_url
from worker.store.eviction import check_eviction_policies
from worker.store.layout import check_store_layout

__all__ = ["app"]

settings = get_settings()
# Our transport (worker.consume.transport; on sentinels, worker.consume.sentinel_transport),
# chosen here only: by URL scheme, so that a failover switch keeps it, and with a Connection that
# shows Flower the Redis or sentinel URL it stands for.
app = make_celery(settings, main="worker", amqp=AMQP_CLASS)
app.conf.broker_url = transport_url(app.conf.broker_url)
app.conf.broker_transport_options = {
    **app.conf.broker_transport_options,
    "fetch_max": settings.fetch_max,
    # A woken worker waits out ITRAIN_BATCH_WAIT_MS before its fetch while messages come fast
    # (worker.consume.fetch_window); the task strategy then holds them no longer.
    "fetch_window": settings.batch_wait_ms / 1000.0 if settings.batch_wait_adaptive else 0.0,
    "fetch_bytes": settings.fetch_bytes,
    # The whole envelope, headers included, is bounded before it is parsed. The largest body a
    # message may carry takes a third more in base64; twice the body limit leaves room for
    # headers and lets a body somewhat over its limit still be answered by a FAILURE naming
    # ITRAIN_MAX_MESSAGE_BYTES. Beyond this, the item is dropped unread (logged, and recorded in
    # itrain:{_transport}:rejected): a 50 MiB header never reaches the worker's memory.
    "max_envelope_bytes": settings.max_message_bytes * 2 + 65_536,
}
if is_sentinel_url(settings.broker):
    # Flower's broker pages ask one sentinel: through this pool, the first that answers.
    sentinel_kwargs = app.conf.broker_transport_options["sentinel_kwargs"]
    app.conf.broker_transport_options["sentinel_kwargs"] = {
        **sentinel_kwargs,
        FLOWER_POOL: any_sentinel_pool(
            parse_sentinel_url(settings.broker, "ITRAIN_BROKER_URL"), sentinel_kwargs
        ),
    }
app.conf.update(include=["worker.consume.tasks"])
# A worker consumes every queue of ITRAIN_QUEUES (default: ITRAIN_QUEUE alone), unless Celery's -Q
# names others; publishing still routes to ITRAIN_QUEUE (or a model's own queue).
app.conf.task_queues = [Queue(name, routing_key=name) for name in settings.queue_names]  # type: ignore[no-untyped-call]
# First sightings of unstamped head messages, for the queues' ages (itrain exporter).
app.steps["worker"].add(QueueHeadsStep)
if settings.worker_concurrency:
    app.conf.worker_concurrency = settings.worker_concurrency
# The prefork pool, keeping a half-read job result across a consumer reconnect (``-P prefork``
# means it too): worker/consume/prefork.py.
app.conf.worker_pool = "worker.consume.prefork:TaskPool"


def _refuse_unusable_redis(sender: Any = None, **_: Any) -> None:
    """``celery -A worker worker`` stops here, in its main process, unless every Redis it uses
    is Redis 7.0 or later (else every fetch fails and the consumer reconnects for ever), runs
    ``maxmemory-policy noeviction``, and the store's layout is one this release reads (a newer
    one could mean anything: refused before a message is taken). Flower and producers never
    send ``worker_init``."""
    if getattr(sender, "app", None) is not app:
        return
    try:
        check_server_versions(settings)
        check_store_layout(settings)
        check_eviction_policies(settings)
    except ConfigurationError as exc:
        # Celery logs and swallows an Exception raised by a signal handler; SystemExit is not one,
        # so the worker exits non-zero with this line and no traceback.
        print(f"error: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


worker_init.connect(_refuse_unusable_redis)


_kernel_seconds: list[float] = []


def _compile_kernel(**_: Any) -> None:
    """Compile the SGD kernel (or load it from numba's cache) in the worker's main process, before
    the pool forks: every pool process inherits the machine code and none compiles on its own."""
    from worker.engine import kernel  # here, not at import: Flower and the CLI load the app too

    started = time.perf_counter()
    kernel.warm_up()
    _kernel_seconds.append(time.perf_counter() - started)


def _log_kernel(**_: Any) -> None:
    # Celery configures logging after worker_init: the time is logged once it has.
    log = logging.getLogger("itrain.kernel")
    for seconds in _kernel_seconds:
        log.info("SGD kernel ready in %.2f s (compiled, or loaded from numba's cache)", seconds)
    if not settings.hash_key_bytes:
        logging.getLogger("itrain.features").warning(
            "ITRAIN_HASH_KEY is not set: user ids are hashed without a secret key, so a stored "
            "feature can be matched to a user id by hashing likely ids; set the same "
            "ITRAIN_HASH_KEY on every worker and ModelReader of a model (changing it changes every "
            "user's input)"
        )


worker_init.connect(_compile_kernel, weak=False)

#: Container allocations between young-generation collections (CPython's default is 700).
GC_YOUNG_THRESHOLD = 50_000


def _tune_gc(**_: Any) -> None:
    """Fewer garbage-collector passes in the worker and its pool processes (inherited at fork).

    A pool job allocates tens of thousands of short-lived objects (events, features, results),
    freed by reference counting; with the default thresholds the cycle collector still ran every
    700 allocations and scanned the long-lived ones too, and took more CPU than training
    (measured: ~20 µs an event). Objects alive now (modules, the compiled kernel, the app) are
    frozen out of every scan; cyclic garbage waits at most ``GC_YOUNG_THRESHOLD`` allocations.
    """
    gc.freeze()
    _young, older, oldest = gc.get_threshold()
    gc.set_threshold(GC_YOUNG_THRESHOLD, older, oldest)


worker_init.connect(_tune_gc, weak=False)  # after _compile_kernel: its objects are frozen too
celeryd_after_setup.connect(_log_kernel, weak=False)

# Signal receivers: ITRAIN_POOL_FETCH's decide at worker_init and start each pool process's
# fetcher; shutdown_wake's makes SIGTERM wake the event loop.
from worker.consume import pool_fetch, shutdown_wake  # noqa: E402, F401
