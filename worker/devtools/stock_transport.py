"""The production app on kombu's stock Redis transport, for ``itrain bench`` only.

``celery -A worker.devtools.stock_transport worker`` runs the same tasks, strategy and settings
as a production worker, except that messages come through kombu's own Redis transport (``BRPOP``
then a separate unacked record, one ack per round trip): the benchmark's "before" beside our
transport's "after", measured in one run. Never for production: it has the loss window that our
transport closes.
"""

from __future__ import annotations

from worker.consume import tasks as _tasks  # noqa: F401 - the production tasks
from worker.consume.app import app, settings

__all__ = ["APP", "app"]

#: The ``-A`` argument of such a worker.
APP = "worker.devtools.stock_transport"

app.conf.broker_url = settings.broker
