"""The wire format: task names, the Celery message envelope in Redis, and where results appear.

A service in any language can enqueue with nothing but a Redis client: LPUSH the JSON envelope
built here onto the list named by ``ITRAIN_QUEUE``, then GET ``celery-task-meta-<task id>``.
The README's "Enqueue from any language" section walks through it command by command.
"""

from __future__ import annotations

import base64
import uuid
from typing import Any

import orjson

__all__ = [
    "RESULT_KEY_PREFIX",
    "TASK_PREDICT",
    "TASK_TRAIN_BATCH",
    "TASK_TRAIN_STEP",
    "encode_envelope",
    "new_task_id",
    "result_key",
]

TASK_TRAIN_STEP = "itrain.train_step"
#: One message carrying many events, each with its own result id (``TrainingClient.train_many``).
TASK_TRAIN_BATCH = "itrain.train_batch"
TASK_PREDICT = "itrain.predict"
#: Celery's Redis result backend keeps a task's result under this prefix + task id.
RESULT_KEY_PREFIX = "celery-task-meta-"


def result_key(task_id: str) -> str:
    return RESULT_KEY_PREFIX + task_id


def new_task_id() -> str:
    return str(uuid.uuid4())


def encode_envelope(
    task: str,
    task_id: str,
    args: list[Any],
    queue: str,
    *,
    argsrepr: str | None = None,
    ignore_result: bool = False,
) -> bytes:
    """A Celery protocol 2 message as kombu's Redis transport stores it in the queue list.

    ``ignore_result``: Celery's header of the same name; the worker then writes no result for
    the message's events (fire-and-forget), and still trains them and dead-letters failures."""
    body = orjson.dumps([args, {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}])
    envelope = {
        "body": base64.b64encode(body).decode("ascii"),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": {
            "lang": "py",
            "task": task,
            "id": task_id,
            "root_id": task_id,
            "parent_id": None,
            "group": None,
            "retries": 0,
            "eta": None,
            "expires": None,
            "argsrepr": argsrepr,
            "kwargsrepr": None,
            "origin": "itrain-producer",
            "ignore_result": ignore_result,
        },
        "properties": {
            "correlation_id": task_id,
            "reply_to": "",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }
    return orjson.dumps(envelope)
