"""The worker's Celery app: ``celery -A worker worker`` and ``celery -A worker flower`` find it."""

from __future__ import annotations

from producer.celery_config import make_celery
from producer.settings import get_settings

__all__ = ["app"]

settings = get_settings()
app = make_celery(settings, main="worker")
app.conf.update(include=["worker.tasks", "worker.naive"])
if settings.worker_concurrency:
    app.conf.worker_concurrency = settings.worker_concurrency
