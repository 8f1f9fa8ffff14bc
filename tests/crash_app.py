"""The production worker app, with a pool job that misbehaves on cue (for the pool-death tests).

``celery -A tests.crash_app worker`` runs the worker exactly as ``celery -A worker worker`` does,
except that ``worker.consume.batching.run_messages`` is wrapped, in this process only:

* a pool job holding a message whose body contains ``crash-me`` ends its pool process at once
  (``os._exit(1)``), as a segfault or the OOM killer would;
* a pool job holding ``redis-fault`` raises ``redis.exceptions.ConnectionError`` the first time
  only (a marker file remembers), as an unreachable Redis would.

Each job appends one line to ``ITRAIN_TEST_JOB_LOG``: the task ids it holds, space-separated.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import redis

import worker.consume.batching as batching
from worker import app
from worker.consume.messages import RawMessage
from worker.consume.runtime import Summary

__all__ = ["app"]

_run_messages = batching.run_messages


def run_messages(messages: Sequence[RawMessage], **options: bool) -> list[Summary]:
    log = os.environ.get("ITRAIN_TEST_JOB_LOG")
    if log:
        with open(log, "a") as out:
            out.write(" ".join(m.task_id for m in messages) + "\n")
    if any(b"crash-me" in m.body for m in messages):
        os._exit(1)
    marker = Path(log + ".redis-fault") if log else None
    if marker and not marker.exists() and any(b"redis-fault" in m.body for m in messages):
        marker.touch()
        raise redis.exceptions.ConnectionError("injected: Redis unreachable")
    return _run_messages(messages, **options)


batching.run_messages = run_messages
