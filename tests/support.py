"""Helpers shared by test modules that start their own groups of worker processes."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from producer.celery_config import make_celery
from producer.settings import Settings


def wait_for_names(
    redis_url: str, names: list[str], procs: list[Any], logs: Path, timeout: float = 90
) -> None:
    """Until every named worker answers a ping; fails at once if one of ``procs`` exits."""
    app = make_celery(Settings(redis_url=redis_url), main="itrain-test-ping")
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in procs):
                raise AssertionError(f"a worker exited during start-up; logs in {logs}")
            replies = app.control.ping(timeout=1.0) or []
            seen = {name.split("@", 1)[0] for reply in replies for name in reply}
            if set(names) <= seen:
                return
            time.sleep(0.2)
        raise AssertionError(f"workers {names} did not answer a ping within {timeout:g} s; logs in {logs}")
    finally:
        app.close()
