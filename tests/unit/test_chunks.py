"""The stored form of a chunk's result and how one event's meta is read from it (pure functions)."""

from __future__ import annotations

from typing import Any

import pytest

from producer.chunks import (
    chunk_result,
    event_meta,
    event_state,
    handle_id,
    handle_ids,
    is_chunk_result,
    merge_chunk,
    parse_handle_id,
)

FAILED = {"exc_type": "InvalidEventError", "exc_message": ["timestamp: bad"], "exc_module": "producer.errors"}
DUPLICATE = {"status": "duplicate", "model": "m", "event_id": "e2"}


def chunk(entries: list[Any], models: list[str] | None = None, status: str = "SUCCESS") -> dict[str, Any]:
    ids = [f"e{i + 1}" for i in range(len(entries))]
    result = chunk_result(models or ["m"] * len(entries), ids, entries)  # type: ignore[arg-type]
    return {"status": status, "result": result, "date_done": "2026-11-27T10:00:00+00:00", "task_id": "c"}


def test_handle_ids_name_their_chunk_and_index() -> None:
    assert handle_id("abc-1", 7) == "abc-1:7"
    assert parse_handle_id("abc-1:7") == ("abc-1", 7)
    assert parse_handle_id("a:b:12") == ("a:b", 12)
    for other in ("0b9c6a1e-8a0e-4d2f-9d0b-3f6f0d1f9a11", ":3", "abc:", "abc:x1"):
        assert parse_handle_id(other) is None


def test_one_model_is_stored_once_and_many_per_event() -> None:
    assert chunk_result(["m", "m"], ["a", "b"], [[1, 2, 0.5], [2, 2, 0.4]])["model"] == "m"
    assert chunk_result(["m", "n"], ["a", "b"], [[1, 2, 0.5], [1, 2, 0.4]])["model"] == ["m", "n"]


def test_event_meta_of_each_kind_of_entry() -> None:
    stored = chunk([[5, 3, 0.25], DUPLICATE, FAILED], models=["m", "", ""])
    trained = event_meta(stored, 0, "c:0")
    assert trained["status"] == "SUCCESS"
    assert trained["result"] == {
        "status": "trained",
        "model": "m",
        "event_id": "e1",
        "step": 5,
        "version": 3,
        "loss": 0.25,
    }
    assert trained["task_id"] == "c:0"
    assert trained["date_done"] == "2026-11-27T10:00:00+00:00"
    assert event_meta(stored, 1, "c:1")["result"] == DUPLICATE
    failed = event_meta(stored, 2, "c:2")
    assert (failed["status"], failed["result"]) == ("FAILURE", FAILED)


def test_a_failed_message_fails_every_event_and_a_foreign_value_is_an_error() -> None:
    whole = {"status": "FAILURE", "result": FAILED, "task_id": "c"}
    assert event_meta(whole, 4, "c:4")["result"] == FAILED
    foreign = {"status": "SUCCESS", "result": {"status": "trained"}, "task_id": "c"}
    assert event_meta(foreign, 0, "c:0")["status"] == "FAILURE"
    assert event_meta(chunk([[1, 2, 0.5]]), 3, "c:3")["status"] == "FAILURE"  # no such index
    assert not is_chunk_result(foreign)


def test_merge_keeps_every_entry_but_a_trained_one_replacing_a_lesser_one() -> None:
    old = chunk([FAILED, [1, 2, 0.5], DUPLICATE])
    new = chunk([[7, 4, 0.3], DUPLICATE, [8, 4, 0.2]])
    merged = merge_chunk(old, new)
    assert merged is not None
    assert merged["result"]["results"] == [[7, 4, 0.3], [1, 2, 0.5], [8, 4, 0.2]]
    # Nothing to change: the stored value stands
    assert merge_chunk(merged, chunk([DUPLICATE, DUPLICATE, DUPLICATE])) is None
    # Another chunk's events: nothing is taken over
    other = chunk([[9, 9, 0.1], [9, 9, 0.1], [9, 9, 0.1]])
    other["result"]["ids"] = ["x", "y", "z"]
    assert merge_chunk(old, other) is None
    # A message that failed whole, then trained: the chunk's result replaces the failure
    assert merge_chunk({"status": "FAILURE", "result": FAILED}, new) == new


def test_handle_ids_are_each_handle_id_in_order() -> None:
    assert handle_ids("c-1", 12) == [handle_id("c-1", i) for i in range(12)]
    assert [parse_handle_id(v) for v in handle_ids("c-1", 3)] == [("c-1", 0), ("c-1", 1), ("c-1", 2)]
    assert handle_ids("c-1", 0) == []


@pytest.mark.parametrize(
    "meta",
    [
        chunk([[1, 2, 0.5], FAILED, DUPLICATE, None]),
        chunk([[1, 2, 0.5], [2, 2, 0.25]], models=["a", "b"]),
        chunk([[1, 2, 0.5]], status="FAILURE"),
        {"status": "SUCCESS", "result": {"not": "a chunk"}},
        {"status": "PENDING", "result": None},
    ],
    ids=["mixed", "two-models", "failed-chunk", "not-a-chunk", "pending"],
)
def test_event_state_is_the_status_and_result_of_event_meta(meta: dict[str, Any]) -> None:
    """What ``wait_all`` reads of each event is what its full meta says, checked or not."""
    for i in range(5):
        task_id = handle_id("c", i)
        full = event_meta(meta, i, task_id)
        assert event_state(meta, i, task_id) == (full["status"], full["result"])
        assert event_state(meta, i, task_id, checked=is_chunk_result(meta)) == (
            full["status"],
            full["result"],
        )
