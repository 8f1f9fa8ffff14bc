"""The Celery configuration shared by producers and workers, built from ``Settings``."""

from __future__ import annotations

from typing import Any

from celery import Celery
from kombu import Queue  # type: ignore[attr-defined]
from kombu.utils.objects import cached_property

from producer.backend import backend_url
from producer.broker_transport import TRANSPORT as BROKER_TRANSPORT
from producer.protocol import TASK_PREDICT, TASK_TRAIN_BATCH, TASK_TRAIN_STEP
from producer.redis_conn import CERT_REQS, ssl_options
from producer.sentinel import SentinelURL, is_sentinel_url, parse_sentinel_url
from producer.settings import Settings

__all__ = ["celery_config", "make_celery"]


def _transport_options(settings: Settings) -> dict[str, Any]:
    return {
        # A message of a dead worker comes back after this long, not the transport's hour.
        "visibility_timeout": settings.visibility_timeout,
        # kombu's Redis transport looks for such messages every interval * throttle seconds,
        # 10 * 10 by default: without these two, they came back ~100 s late whatever the timeout.
        "unacked_restore_interval": max(1.0, min(10.0, settings.visibility_timeout / 4)),
        "unacked_restore_throttle": 1,
        "socket_timeout": settings.publish_timeout,
        "socket_connect_timeout": settings.publish_timeout,
        "retry_on_timeout": True,
        # Bounded: a dead Redis gives a clear error instead of a hang (the client also retries
        # publishing until ITRAIN_PUBLISH_TIMEOUT).
        "max_retries": 3,
        "interval_start": 0,
        "interval_step": 0.2,
        "interval_max": 1.0,
    }


def _sentinel_options(parsed: SentinelURL, settings: Settings) -> dict[str, Any]:
    """kombu's (and Flower's) transport options for a sentinel broker: the master's name and the
    sentinels' login, TLS and timeouts (without one, a hung sentinel holds a publish for ever)."""
    return {
        "master_name": parsed.required_master(),
        "sentinel_kwargs": parsed.sentinel_kwargs(settings.publish_timeout),
    }


def _broker_tls(parsed: SentinelURL) -> dict[str, Any] | None:
    if not parsed.ssl:
        return None
    options = {k: v for k, v in parsed.ssl_kwargs().items() if k != "ssl"}
    options["ssl_cert_reqs"] = CERT_REQS[options["ssl_cert_reqs"]]
    return options


def celery_config(settings: Settings) -> dict[str, Any]:
    """Settings for both sides. JSON only: a pickle message is refused, never executed."""
    transport = _transport_options(settings)
    broker = settings.broker
    tls: dict[str, Any] = {}
    use_ssl = ssl_options(broker)
    if is_sentinel_url(broker):
        # kombu refuses options it does not know in a URL: the master's name and the sentinels'
        # login go to the transport options.
        parsed = parse_sentinel_url(broker, "ITRAIN_BROKER_URL")
        broker = parsed.url(own_options=False)
        transport.update(_sentinel_options(parsed, settings))
        use_ssl = _broker_tls(parsed)
    if use_ssl is not None:
        # The URL's TLS options again, as Celery's setting: Flower's broker pages (/broker,
        # /api/queues/length) connect with these, not with the URL's.
        tls["broker_use_ssl"] = use_ssl
    return {
        **tls,
        "broker_url": broker,
        "result_backend": backend_url(settings.backend, producer=False),
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "result_accept_content": ["json"],
        "task_default_queue": settings.queue,
        "task_queues": [Queue(settings.queue, routing_key=settings.queue)],  # type: ignore[no-untyped-call]
        "task_routes": {
            name: {"queue": settings.queue} for name in (TASK_TRAIN_STEP, TASK_TRAIN_BATCH, TASK_PREDICT)
        },
        "result_expires": settings.result_expires,
        "result_extended": False,
        "broker_transport_options": transport,
        "result_backend_transport_options": {
            **_transport_options(settings),
            # The backend's own default is 20 retries a second apart: a producer would hang for
            # minutes on a dead Redis. Bounded like publishing instead.
            "retry_policy": {
                "max_retries": 2,
                "interval_start": 0,
                "interval_step": 0.2,
                "interval_max": 0.5,
            },
        },
        "visibility_timeout": settings.visibility_timeout,
        "redis_socket_timeout": settings.publish_timeout,
        "redis_socket_connect_timeout": settings.publish_timeout,
        "redis_retry_on_timeout": True,
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "task_publish_retry": True,
        "task_publish_retry_policy": {
            "max_retries": 3,
            "interval_start": 0,
            "interval_step": 0.2,
            "interval_max": 1.0,
        },
        # At-least-once: acknowledge after the work, requeue when a pool child dies.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": settings.prefetch_multiplier,
        # Flower sees every task: sent, received, started, succeeded, failed.
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "task_track_started": False,
        "enable_utc": True,
        "timezone": "UTC",
        "broker_channel_error_retry": True,
    }


def make_celery(
    settings: Settings, main: str = "itrain", *, producer: bool = False, amqp: str | None = None
) -> Celery:
    """A Celery app configured for the project. ``producer``: the publishing side's app, whose
    result backend subscribes to a result only when someone waits for it. ``amqp``: Celery's
    ``amqp`` class, by name (the worker's shows its transport's URL as a Redis one)."""
    app = (_ProducerCelery if producer else Celery)(main, set_as_current=False, amqp=amqp)
    app.conf.update(celery_config(settings))
    if producer:
        app.conf.result_backend = backend_url(settings.backend)
        if not is_sentinel_url(settings.broker):
            # Connections that let go of a demoted master (producer.broker_transport).
            app.conf.broker_transport = BROKER_TRANSPORT
        # One connection attempt per publish: TrainingClient retries within ITRAIN_PUBLISH_TIMEOUT.
        app.conf.broker_transport_options = {
            **app.conf.broker_transport_options,
            "max_retries": 0,
            "retry_on_timeout": False,
        }
    return app


class _ProducerCelery(Celery):  # type: ignore[misc]
    """The publishing side's app: ``app.AsyncResult(id)`` knows ``train_many``'s chunk events."""

    @cached_property
    def AsyncResult(self) -> Any:
        return self.subclass_with_self("producer.handles:AppResult")
