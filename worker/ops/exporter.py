"""``itrain exporter``: Prometheus metrics of every model, read from Redis at each scrape.

A scrape costs two Redis round trips whatever the number of models: the models set and the
routes (``itrain:routes``, model -> queue), then one pipeline reading every model's checkpoint
figures, counters, action counts, dead letters, lock and latency histograms, every queue's length
and head, and the server's memory and clock. Nothing is cached between scrapes, so any
number of exporters (or none) may run, and a restarted one reports the same values; the one
exception is the age of a queue head without an enqueue time that no worker has seen yet, which
the exporter counts from its own first sight (``worker.ops.queue_age``).

| metric | type | labels | what |
|---|---|---|---|
| ``itrain_up`` | gauge | | 1 when the last scrape read Redis, else 0 |
| ``itrain_model_step`` | gauge | model | events trained (the checkpoint's step) |
| ``itrain_model_version`` | gauge | model | the checkpoint version |
| ``itrain_model_loss_last`` / ``_loss_ema`` | gauge | model | the last event's loss, its moving average |
| ``itrain_model_updated_timestamp_seconds`` | gauge | model | when the checkpoint was last committed |
| ``itrain_interactions_total`` | counter | model, action | events trained, by action type |
| ``itrain_failures_total`` | counter | model | events that ended as FAILURE |
| ``itrain_dead_letters`` | gauge | model | entries in the (bounded) dead-letter list |
| ``itrain_lock_wait_seconds`` | histogram | model | time to get the model's lock, per critical section |
| ``itrain_lock_hold_seconds`` | histogram | model | time the lock was held, per critical section |
| ``itrain_enqueue_to_commit_seconds`` | histogram | model | per trained event, from its message's |
| | | | enqueue time to the commit that trained it (``worker.engine.latency``) |
| ``itrain_event_freshness_seconds`` | histogram | model | per trained event, from its own |
| | | | ``timestamp`` to the commit that trained it |
| ``itrain_dead_lettered_total`` | counter | model, error | events dead-lettered, by error type (the |
| | | | dead letter's ``error``); ``model="_unrouted"`` for those naming no initialised model |
| ``itrain_eval_logloss`` / ``_mse`` / ``_accuracy`` | gauge | model, scope | online evaluation |
| | | | (``producer.evaluation``): ``scope`` is ``window`` (the last ``ITRAIN_EVAL_WINDOW``) or ``total`` |
| ``itrain_eval_auc`` | gauge | model | the window's AUC (single-output models, both classes present) |
| ``itrain_eval_events`` | gauge | model, scope | events the evaluation counts |
| ``itrain_guard_paused`` | gauge | model | 1 while a tripped guard keeps training paused |
| ``itrain_guard_trips`` | counter | model | times the model's guard tripped |
| ``itrain_queue_messages`` | gauge | queue | messages waiting in the queue list |
| ``itrain_queue_oldest_age_seconds`` | gauge | queue | age of the message workers take next |
| | | | (``worker.ops.queue_age``); 0 when the queue is empty |
| ``itrain_unacked_messages`` | gauge | | messages taken by workers, not yet acknowledged |
| ``itrain_redis_memory_used_bytes`` | gauge | | ``INFO memory`` ``used_memory`` of the store's Redis |

The queues reported are the ones the exporter is given (``ITRAIN_QUEUE``) and every queue named in
``itrain:routes`` when that hash exists.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import orjson
import redis
from prometheus_client import make_wsgi_app
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

from producer.evaluation import eval_report
from producer.keys import (
    LATENCY_BUCKETS,
    LOCK_BUCKETS,
    MODELS,
    QUEUE_HEADS,
    ROUTES,
    UNROUTED_DEAD_ERRORS,
    ModelKeys,
)
from producer.routes import parse_routes
from worker.engine.latency import ENQUEUE_TO_COMMIT, FRESHNESS
from worker.ops.exporter_http import Access, serve_wsgi
from worker.ops.queue_age import HeadAges

__all__ = ["DEFAULT_PORT", "ItrainCollector", "serve"]

DEFAULT_PORT = 9810
logger = logging.getLogger("itrain.exporter")

#: The model label of dead letters that name no initialised model.
UNROUTED = "_unrouted"
#: Every error a dead letter can name, exported at 0 until met: a counter that appeared only at
#: its first dead letter would hide that one from ``rate()``.
DEAD_LETTER_ERRORS = (
    "DeliveryExpiredError",
    "DeliveryLimitError",
    "EventProcessingError",
    "GuardTrippedError",
    "InvalidEventError",
    "ItrainError",
    "LockTimeoutError",
    "MessageFormatError",
    "NonFiniteUpdateError",
    "TargetError",
    "WorkerLostError",
)


class ItrainCollector(Collector):
    """Reads every model's figures at each scrape (see the module's table)."""

    def __init__(self, client: redis.Redis, queues: Sequence[str]) -> None:
        self.client = client
        self.queues = list(queues)
        #: Redis round trips made by the last scrape (for the tests and the curious).
        self.round_trips = 0
        self._heads = HeadAges()

    def collect(self) -> Iterator[Metric]:
        up = GaugeMetricFamily("itrain_up", "1 when the last scrape read Redis, else 0")
        try:
            families = self._read()
        except redis.RedisError as exc:
            logger.warning("scrape failed: %s", exc)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from families

    def _read(self) -> list[Metric]:
        self.round_trips = 1
        first = self.client.pipeline(transaction=False)
        first.smembers(MODELS)
        first.hgetall(ROUTES)
        found, routes = first.execute()
        models = sorted(m.decode() if isinstance(m, bytes) else m for m in found)
        queues = self.queues_of(routes)
        pipe = self.client.pipeline(transaction=False)
        for model in models:
            keys = ModelKeys(model)
            pipe.hmget(keys.ckpt, [*_CKPT_GAUGES[:4], "updated_at", *_EVAL_FIELDS])
            pipe.hmget(keys.stats, ["failures"])
            pipe.hgetall(keys.actions)
            pipe.llen(keys.dead)
            pipe.hgetall(keys.lock_stats)
            pipe.get(keys.eval_ring)
            pipe.hgetall(keys.latency)
            pipe.hgetall(keys.dead_errors)
        for queue in queues:
            pipe.llen(queue)
            pipe.lindex(queue, -1)  # the head: the message workers take next
        pipe.hlen("unacked")
        pipe.info("memory")
        pipe.hgetall(QUEUE_HEADS)
        pipe.time()
        pipe.hgetall(UNROUTED_DEAD_ERRORS)
        replies = pipe.execute()
        self.round_trips = 2
        per_model, rest = replies[: _PER_MODEL * len(models)], replies[_PER_MODEL * len(models) :]
        unrouted = rest.pop()
        return [*_model_metrics(models, per_model, unrouted), *self._server_metrics(queues, rest)]

    def queues_of(self, routes: dict[bytes, bytes]) -> list[str]:
        """The queues to measure: the configured ones (the first is ``ITRAIN_QUEUE``), then every
        queue a route names."""
        routed = parse_routes(routes, self.queues[0]).values() if self.queues else ()
        return list(dict.fromkeys([*self.queues, *sorted(routed)]))

    def _server_metrics(self, queues: list[str], replies: list[Any]) -> list[Metric]:
        queue = GaugeMetricFamily("itrain_queue_messages", "Messages waiting in the queue", labels=["queue"])
        oldest = GaugeMetricFamily(
            "itrain_queue_oldest_age_seconds",
            "Age of the oldest waiting message (the one workers take next); 0 when the queue is empty",
            labels=["queue"],
        )
        per_queue, (unacked, memory, noted, (seconds, micros)) = (
            replies[: 2 * len(queues)],
            replies[2 * len(queues) :],
        )
        now = seconds + micros / 1e6  # Redis's clock: the one the workers' first sightings use
        for i, name in enumerate(queues):
            length, head = per_queue[2 * i : 2 * i + 2]
            queue.add_metric([name], int(length))
            oldest.add_metric([name], self._heads.age(name, head, noted.get(name.encode()), now))
        return [
            queue,
            oldest,
            GaugeMetricFamily(
                "itrain_unacked_messages",
                "Messages taken by workers, not yet acknowledged",
                value=int(unacked),
            ),
            GaugeMetricFamily(
                "itrain_redis_memory_used_bytes",
                "used_memory of the store's Redis (INFO memory)",
                value=int(memory["used_memory"]),
            ),
        ]


_CKPT_GAUGES = ("step", "version", "loss_last", "loss_ema", "updated_timestamp_seconds")
#: The checkpoint's fields of the online evaluation and the guard, after the gauges'.
_EVAL_FIELDS = ("config", "eval", "eval_wn", "eval_cap", "paused", "trips")
#: Replies per model in the scrape's pipeline.
_PER_MODEL = 8
_CKPT_TEXTS = (
    "Events trained (the checkpoint's step)",
    "The checkpoint version",
    "Loss of the last trained event, before its update",
    "Moving average of the per-event loss",
    "When the checkpoint was last committed (epoch seconds)",
)


def _model_metrics(models: list[str], replies: list[Any], unrouted: dict[bytes, bytes]) -> list[Metric]:
    gauges = {
        name: GaugeMetricFamily(f"itrain_model_{name}", text, labels=["model"])
        for name, text in zip(_CKPT_GAUGES, _CKPT_TEXTS, strict=True)
    }
    interactions = CounterMetricFamily(
        "itrain_interactions", "Events trained, by action type", labels=["model", "action"]
    )
    failures = CounterMetricFamily("itrain_failures", "Events that ended as FAILURE", labels=["model"])
    dead = GaugeMetricFamily(
        "itrain_dead_letters", "Entries in the bounded dead-letter list", labels=["model"]
    )
    wait = HistogramMetricFamily(
        "itrain_lock_wait_seconds", "Time to get the model's lock, per critical section", labels=["model"]
    )
    hold = HistogramMetricFamily(
        "itrain_lock_hold_seconds", "Time the model's lock was held, per critical section", labels=["model"]
    )
    enqueued = HistogramMetricFamily(
        "itrain_enqueue_to_commit_seconds",
        "Time from a trained event's enqueue to the commit that trained it",
        labels=["model"],
    )
    freshness = HistogramMetricFamily(
        "itrain_event_freshness_seconds",
        "Time from a trained event's own timestamp to the commit that trained it",
        labels=["model"],
    )
    dead_lettered = CounterMetricFamily(
        "itrain_dead_lettered", "Events dead-lettered, by error type", labels=["model", "error"]
    )
    evaluation = _EvalFamilies()
    for i, model in enumerate(models):
        ckpt, (fails,), actions, dead_len, lock_stats, ring, latency, errors = replies[
            _PER_MODEL * i : _PER_MODEL * (i + 1)
        ]
        evaluation.add(model, ckpt[len(_CKPT_GAUGES) :], ring)
        for name, raw in zip(_CKPT_GAUGES, ckpt, strict=False):
            if raw not in (None, b""):
                gauges[name].add_metric([model], float(raw))
        for action, count in sorted(actions.items()):
            interactions.add_metric([model, action.decode(errors="replace")], float(count))
        failures.add_metric([model], float(fails or 0))
        dead.add_metric([model], float(dead_len))
        for family, prefix in ((wait, "w"), (hold, "h")):
            buckets, total = histogram(lock_stats, prefix)
            family.add_metric([model], buckets, total)
        for family, prefix in ((enqueued, ENQUEUE_TO_COMMIT), (freshness, FRESHNESS)):
            buckets, total = histogram(latency, prefix, LATENCY_BUCKETS)
            family.add_metric([model], buckets, total)
        _add_dead_lettered(dead_lettered, model, errors)
    _add_dead_lettered(dead_lettered, UNROUTED, unrouted)
    return [
        *gauges.values(),
        interactions,
        failures,
        dead,
        dead_lettered,
        wait,
        hold,
        enqueued,
        freshness,
        *evaluation.families(),
    ]


def _add_dead_lettered(family: CounterMetricFamily, model: str, counts: dict[bytes, bytes]) -> None:
    """One series per error type of ``model``: the known ones (0 until met) and any other met."""
    found = {name.decode(errors="replace"): float(count) for name, count in counts.items()}
    for error in sorted({*DEAD_LETTER_ERRORS, *found}):
        family.add_metric([model, error], found.get(error, 0.0))


class _EvalFamilies:
    """The online evaluation's and the guard's metric families, filled model by model."""

    def __init__(self) -> None:
        def gauge(name: str, text: str, *labels: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"itrain_eval_{name}", text, labels=["model", *labels])

        self.scoped = {
            "logloss": gauge(
                "logloss", "Mean log loss of each event's prediction before its update", "scope"
            ),
            "mse": gauge("mse", "Mean squared error of each event's prediction before its update", "scope"),
            "accuracy": gauge("accuracy", "Accuracy at 0.5 over targets that are 0 or 1", "scope"),
            "count": gauge("events", "Events the online evaluation counts", "scope"),
        }
        self.auc = gauge("auc", "AUC over the window (single-output models, both classes present)")
        self.paused = GaugeMetricFamily(
            "itrain_guard_paused", "1 while a tripped guard keeps training paused", labels=["model"]
        )
        self.trips = CounterMetricFamily(
            "itrain_guard_trips", "Times the model's guard tripped", labels=["model"]
        )

    def add(self, model: str, fields: list[Any], ring: bytes | None) -> None:
        config, state, wn, cap, paused, trips = fields
        self.paused.add_metric([model], 1.0 if paused else 0.0)
        self.trips.add_metric([model], float(trips or 0))
        outputs = int(orjson.loads(config).get("outputs", 1)) if config else 1
        report = eval_report(state, wn, cap, ring, outputs)
        for scope, figures in (("window", report), ("total", report["total"])):
            for name, family in self.scoped.items():
                if figures[name] is not None:
                    family.add_metric([model, scope], float(figures[name]))
        if report["auc"] is not None:
            self.auc.add_metric([model], float(report["auc"]))

    def families(self) -> list[Metric]:
        return [*self.scoped.values(), self.auc, self.paused, self.trips]


def histogram(
    fields: dict[bytes, bytes], prefix: str, bounds: Sequence[float] = LOCK_BUCKETS
) -> tuple[list[tuple[str, float]], float]:
    """Cumulative (le, count) buckets and the sum, from the per-bucket counts a worker keeps in
    ``itrain:{m}:lock_stats`` or ``itrain:{m}:latency`` (``<prefix>:<bucket index>``,
    ``<prefix>:sum``) over ``bounds``."""
    cumulative = 0.0
    buckets: list[tuple[str, float]] = []
    for i, bound in enumerate((*bounds, float("inf"))):
        cumulative += float(fields.get(f"{prefix}:{i}".encode(), 0))
        buckets.append(("+Inf" if bound == float("inf") else repr(bound), cumulative))
    return buckets, float(fields.get(f"{prefix}:sum".encode(), 0.0))


def serve(
    client: redis.Redis, queues: Sequence[str], port: int, address: str, access: Access | None = None
) -> threading.Event:
    """Serve ``/metrics`` on ``address:port`` in a background thread, behind basic auth and over TLS
    as ``access`` says (``worker.ops.exporter_http``; default: neither); returns an event that is
    never set (wait on it to serve until interrupted)."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ItrainCollector(client, queues))
    serve_wsgi(make_wsgi_app(registry), address, port, access or Access("prometheus", None, None))
    return threading.Event()
