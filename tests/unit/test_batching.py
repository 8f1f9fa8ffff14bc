"""How the worker's main process turns a kombu message into the plain data a pool process gets."""

from __future__ import annotations

from typing import Any

import pytest
from kombu.message import Message

from producer.protocol import TASK_TRAIN_STEP
from worker.consume.batching import delivery_count, raw_message


@pytest.mark.parametrize(
    ("info", "expected"),
    [
        ({}, 1),
        ({"redelivered": False}, 1),
        ({"redelivered": True}, 2),
        ({"deliveries": 1}, 1),
        ({"deliveries": 7, "redelivered": False}, 7),
        # Not a positive int: counts as absent, whatever a hostile envelope says.
        ({"deliveries": "9"}, 1),
        ({"deliveries": 3.0, "redelivered": True}, 2),
        ({"deliveries": True}, 1),
        ({"deliveries": 0}, 1),
        ({"deliveries": -4, "redelivered": True}, 2),
        ({"deliveries": None}, 1),
    ],
)
def test_delivery_count(info: dict[str, Any], expected: int) -> None:
    assert delivery_count(info) == expected


def _message(**overrides: Any) -> Message:
    fields: dict[str, Any] = {
        "body": b'[[{"event_id": "e"}], {}, {}]',
        "content_type": "application/json",
        "content_encoding": "utf-8",
        "delivery_info": {"deliveries": 3},
        "properties": {"correlation_id": "from-properties"},
        "headers": {"id": "task-1", "argsrepr": "user-secret", "task": TASK_TRAIN_STEP},
    }
    fields.update(overrides)
    return Message(**fields)


def test_raw_message_takes_id_body_and_delivery_count() -> None:
    raw = raw_message(TASK_TRAIN_STEP, _message())
    assert (raw.task, raw.task_id, raw.deliveries) == (TASK_TRAIN_STEP, "task-1", 3)
    assert raw.body == b'[[{"event_id": "e"}], {}, {}]'
    assert "user-secret" not in repr(raw)


def test_raw_message_survives_a_hostile_envelope() -> None:
    # Headers that are not a mapping, a body that is neither bytes nor text, a bad count.
    raw = raw_message(TASK_TRAIN_STEP, _message(headers=None, body=12**40, delivery_info={"deliveries": "x"}))
    assert (raw.task_id, raw.body, raw.deliveries) == ("from-properties", b"", 1)
    # A task id that is not text is left for run_messages to refuse (never str() of it).
    raw = raw_message(TASK_TRAIN_STEP, _message(headers={"id": 10**5000}, body="text"))
    assert (raw.task_id, raw.body) == ("", b"text")
    # Text with a lone surrogate stays bytes that do not decode, instead of raising here.
    raw = raw_message(TASK_TRAIN_STEP, _message(body="[\ud800]"))
    assert raw.body == "[\ud800]".encode("utf-8", "surrogatepass")
    raw = raw_message(TASK_TRAIN_STEP, _message(headers={}, properties=["not", "a", "mapping"]))
    assert raw.task_id == ""


def test_raw_message_reads_ignore_result_only_when_true() -> None:
    # Celery's fire-and-forget header: a JSON true silences results; anything else does not.
    assert raw_message(TASK_TRAIN_STEP, _message()).ignore_result is False
    for value, expected in ((True, True), (False, False), ("true", False), (1, False), (None, False)):
        headers = {"id": "task-1", "task": TASK_TRAIN_STEP, "ignore_result": value}
        assert raw_message(TASK_TRAIN_STEP, _message(headers=headers)).ignore_result is expected
