"""First sight of a queue's head message without an enqueue time, for the queue's age.

``itrain_queue_oldest_age_seconds{queue}`` (``itrain exporter``) is the age of the message
workers take next. Our clients stamp each message with its enqueue time
(``producer.enqueue_time``); a message from another language may carry none, and then its age is
counted from when a worker first saw it at the head of its queue. Each worker looks at the heads of
the queues it consumes once a second (``lua/queue_heads.lua``: one script call, a few
microseconds of Redis, a write only when a new unstamped head appears) and notes the first
sighting in ``itrain:{_queues}:heads``, where the exporter finds it.

Looking from a thread of the worker's main process, not from its fetches, keeps the note going
when every worker is busy and fetches nothing: that is when messages wait. The cost: in a backlog
of unstamped messages the age counts from when each came to the head, not from when it was
enqueued (Redis keeps no time per list item); a queue nobody takes from (the alert's case) still
ages second by second.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from typing import Any

import redis
from celery import bootsteps

from producer.enqueue_time import ENQUEUED_MARK
from producer.keys import QUEUE_HEADS
from producer.redis_conn import connect
from producer.settings import get_settings
from worker.lua import load_lua

__all__ = ["LOOK_EVERY", "QueueHeads", "QueueHeadsStep"]

logger = logging.getLogger("itrain.queue_heads")

#: Seconds between two looks at the heads (the ages' resolution for unstamped messages).
LOOK_EVERY = 1.0


class QueueHeads:
    """Notes first sightings of unstamped head messages on ``queues``."""

    def __init__(self, client: redis.Redis, queues: Sequence[str]) -> None:
        self.client = client
        self.queues = list(queues)
        self._script = client.register_script(load_lua(__package__, "queue_heads"))

    def look(self) -> int:
        """One look at every queue's head; the number of new notes."""
        if not self.queues:
            return 0
        return int(self._script(keys=[QUEUE_HEADS, *self.queues], args=[ENQUEUED_MARK, *self.queues]))

    def watch(self, stop: threading.Event, every: float = LOOK_EVERY) -> None:
        """Look every ``every`` seconds until ``stop`` is set. A Redis error is logged once per
        outage and the looks go on (the worker's consumer reports and rides out the outage)."""
        failing = False
        while not stop.wait(every):
            try:
                self.look()
            except redis.RedisError as exc:
                if not failing:
                    logger.warning("cannot note the queues' heads: %s", exc)
                failing = True
            else:
                failing = False


class QueueHeadsStep(bootsteps.StartStopStep):  # type: ignore[misc]
    """A worker step: watch the heads of the queues this worker consumes from a daemon thread
    of its main process, started once the pool is up."""

    requires = ("celery.worker.components:Pool",)

    def __init__(self, parent: Any, **kwargs: Any) -> None:
        super().__init__(parent, **kwargs)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, parent: Any) -> None:
        queues = parent.app.amqp.queues
        names = sorted((queues.consume_from or queues).keys())
        settings = get_settings()
        heads = QueueHeads(connect(settings.broker, settings.publish_timeout), names)
        self._thread = threading.Thread(
            target=heads.watch, args=(self._stop,), name="itrain-queue-heads", daemon=True
        )
        self._thread.start()

    def stop(self, parent: Any) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)

    shutdown = stop
