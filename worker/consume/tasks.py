"""The Celery tasks. In a worker, messages of the training tasks go through
``worker.batching.training_strategy`` (micro-batches run by ``runtime.run_messages``); the task
bodies here are what runs when a task is called directly (``apply()``, eager mode)."""

from __future__ import annotations

from typing import Any

import orjson
from celery import Task

from producer import errors
from producer.errors import ItrainError
from producer.formats import check_message_format, header_format
from producer.protocol import TASK_PREDICT, TASK_TRAIN_BATCH, TASK_TRAIN_STEP, new_task_id
from worker.consume.app import app
from worker.consume.messages import RawMessage, validate_event
from worker.consume.runtime import ErrorText, get_runtime, run_messages

__all__ = ["TrainingTask", "predict", "train_batch", "train_step"]


class TrainingTask(Task):  # type: ignore[misc]
    """Base of the training tasks: our own message strategy, acknowledged late."""

    Strategy = "worker.consume.batching:training_strategy"
    acks_late = True
    reject_on_worker_lost = True
    #: Whether messages wait for each other to form a micro-batch.
    buffered = False


def _run_direct(task: Task, args: list[Any]) -> Any:
    task_id = task.request.id or new_task_id()
    raw = RawMessage(task.name, task_id, "application/json", "utf-8", None, orjson.dumps([args, {}, {}]))
    ((_, state, result, _, _),) = run_messages([raw])
    if state != "SUCCESS":
        raise _error(result)
    return result


def _error(text: Any) -> ItrainError:
    """The error a failed message's summary names (``GuardTrippedError`` for a paused model,
    ``InvalidEventError`` for an invalid event...), with its text."""
    name = text.exc_type if isinstance(text, ErrorText) else "ItrainError"
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, ItrainError)):
        cls = ItrainError
    return cls(str(text))


@app.task(name=TASK_TRAIN_STEP, base=TrainingTask, bind=True, buffered=True)
def train_step(self: Task, event: dict[str, Any]) -> dict[str, Any]:
    """One event, one training step: ``{status: trained|skipped|duplicate, ...}``."""
    result: dict[str, Any] = _run_direct(self, [event])
    return result


@app.task(name=TASK_TRAIN_BATCH, base=TrainingTask, bind=True, ignore_result=True)
def train_batch(self: Task, ids: list[str], events: list[dict[str, Any]]) -> dict[str, int]:
    """Many events, each with its own result under its id in ``ids``; returns the counts."""
    result: dict[str, int] = _run_direct(self, [ids, events])
    return result


@app.task(
    name=TASK_PREDICT, bind=True, acks_late=True, Request="worker.consume.task_events:HiddenArgsRequest"
)
def predict(self: Task, event: dict[str, Any]) -> dict[str, Any]:
    """``{model, version, prediction}`` for an event, from the current weights. A message of a
    newer format fails with ``MessageFormatError`` (a prediction changes nothing: no dead letter)."""
    # Celery puts a message's own headers on the request.
    check_message_format(header_format(vars(self.request)))
    return get_runtime().trainer.predict(validate_event(event))
