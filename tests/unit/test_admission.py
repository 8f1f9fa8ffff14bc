"""Admission (``worker.consume.admission.admit``): one pass from a message to jobs and refused items."""

from __future__ import annotations

import json
from typing import Any

from producer.errors import InvalidEventError
from producer.protocol import TASK_TRAIN_BATCH, TASK_TRAIN_STEP
from tests.helpers import raw_event
from worker.consume.admission import admit
from worker.consume.messages import RawMessage

MAX = 1_048_576


def _msg(task: str, task_id: str, args: list[Any] | None = None, body: bytes | None = None) -> RawMessage:
    # json, not orjson: a lone surrogate escape (an id that is not text) must reach the worker.
    raw = body if body is not None else json.dumps([args, {}, {}]).encode()
    return RawMessage(task, task_id, "application/json", "utf-8", None, raw)


def test_a_valid_chunk_becomes_its_jobs_and_one_result() -> None:
    events = [raw_event("m", f"e{i}") for i in range(3)]
    got = admit(_msg(TASK_TRAIN_BATCH, "chunk-1", [events]), MAX)
    assert [j.task_id for j in got.jobs] == ["chunk-1:0", "chunk-1:1", "chunk-1:2"]
    assert [j.event.event_id for j in got.jobs] == ["e0", "e1", "e2"]
    assert (got.chunk, got.error, got.events, got.refused) == (3, None, 3, [])


def test_a_batch_with_a_bad_id_and_a_bad_event_refuses_those_two_alone() -> None:
    ids = ["ok-1", "\ud800", "bad-event"]
    events = [raw_event("m", "e1"), raw_event("m", "e2"), raw_event("m", "e3", action_type="")]
    got = admit(_msg(TASK_TRAIN_BATCH, "batch-1", [ids, events]), MAX)
    assert [j.task_id for j in got.jobs] == ["ok-1"]
    assert [(r.task_id, r.answer, type(r.error)) for r in got.refused] == [
        ("\ud800", False, InvalidEventError),  # no result under an id that is not text
        ("bad-event", True, InvalidEventError),
    ]
    assert "action_type" in str(got.refused[1].error)
    assert got.refused[1].payload["event_id"] == "e3"  # routes its dead letter
    assert (got.chunk, got.error, got.events) == (None, None, 3)


def test_a_train_step_with_an_invalid_event_fails_whole() -> None:
    got = admit(_msg(TASK_TRAIN_STEP, "step-1", [raw_event("m", "e1", label="high")]), MAX)
    assert got.jobs == []
    assert got.error is not None
    assert "label" in got.error
    (item,) = got.refused
    assert (item.task_id, item.answer) == ("step-1", True)


def test_a_body_that_is_not_json_fails_whole_under_its_task_id() -> None:
    got = admit(_msg(TASK_TRAIN_STEP, "step-2", body=b"[[{"), MAX)
    assert got.error is not None
    assert "not valid JSON" in got.error
    assert [(r.task_id, r.answer) for r in got.refused] == [("step-2", True)]


def test_a_header_id_that_is_not_text_refuses_the_message_without_any_result() -> None:
    events = [raw_event("m1", "e1"), raw_event("m2", "e2")]
    got = admit(_msg(TASK_TRAIN_BATCH, "\udfff", [events]), MAX)
    assert got.jobs == []
    assert got.error is not None
    assert "task id" in got.error
    # A dead letter for each readable event, in its model's list; no answer at all
    assert [(r.payload["model"], r.answer) for r in got.refused] == [("m1", False), ("m2", False)]
