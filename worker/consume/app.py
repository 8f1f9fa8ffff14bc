"""The worker's Celery app: ``celery -A worker worker`` and ``celery -A worker flower`` find it."""

from __future__ import annotations

import os

# One BLAS thread per pool process: the matrices are tiny, and several processes each starting
# a thread per core only fight over the cores (a 4096-wide step took 4x longer).
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")

from producer.celery_config import make_celery
from producer.settings import get_settings
from worker.consume import kombu_fixes

kombu_fixes.install()

__all__ = ["app"]

settings = get_settings()
app = make_celery(settings, main="worker")
app.conf.update(include=["worker.consume.tasks"])
if settings.worker_concurrency:
    app.conf.worker_concurrency = settings.worker_concurrency
