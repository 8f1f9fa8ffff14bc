"""interaction-trainer's worker side: the Celery app, the tasks and the training engine.

``celery -A worker worker`` finds ``worker.app``. It is made on first access, not on import, so
that importing a helper module (``worker.devtools.embedded_redis``, ``worker.engine.mlp``) reads no settings.
"""

from typing import Any

__all__ = ["app"]


def __getattr__(name: str) -> Any:
    if name in ("app", "celery"):
        import worker.consume.tasks  # noqa: F401 - registers the tasks
        from worker.consume.app import app

        return app
    raise AttributeError(f"module 'worker' has no attribute {name!r}")
