"""How the worker's main process turns a kombu message into the plain data a pool process gets."""

from __future__ import annotations

from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import pytest
from kombu.message import Message

from producer.protocol import TASK_TRAIN_BATCH, TASK_TRAIN_STEP
from producer.settings import get_settings
from worker.consume.batching import raw_message, training_strategy
from worker.consume.redelivery import delivery_count


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


# -- the strategy's buffer: how messages are grouped into pool jobs ---------------------------------


class _Timer:
    """Celery's timer, run by hand: ``fire()`` runs what is due, as the event loop's next turn."""

    def __init__(self) -> None:
        self.entries: list[SimpleNamespace] = []

    def call_after(self, secs: float, fun: Callable[[], None]) -> SimpleNamespace:
        entry = SimpleNamespace(secs=secs, fun=fun, cancelled=False)
        entry.cancel = lambda: setattr(entry, "cancelled", True)
        self.entries.append(entry)
        return entry

    def fire(self) -> None:
        due, self.entries = self.entries, []
        for entry in due:
            if not entry.cancelled:
                entry.fun()


def _strategy(task_name: str, buffered: bool) -> tuple[Callable[..., None], list[list[str]], _Timer]:
    jobs: list[list[str]] = []
    timer = _Timer()
    pool = SimpleNamespace(
        apply_async=lambda fn, args, **_: jobs.append([raw.task_id for raw in args[0]]), num_processes=100
    )
    consumer = SimpleNamespace(pool=pool, timer=timer, connection_errors=())
    task = SimpleNamespace(name=task_name, send_events=False, buffered=buffered)
    return training_strategy(task, None, consumer), jobs, timer  # type: ignore[arg-type]


def _deliver(on_message: Callable[..., None], task: str, ids: list[str]) -> None:
    for task_id in ids:
        on_message(_message(headers={"id": task_id, "task": task}), None, None, None, None)


def test_chunks_of_one_fetch_share_a_pool_job_up_to_batch_max_events() -> None:
    # Given the defaults: 1,024 events a job, a train_many chunk counting as 256
    settings = get_settings()
    per_job = settings.batch_max // settings.chunk_size
    assert per_job == 4
    on_message, jobs, timer = _strategy(TASK_TRAIN_BATCH, buffered=False)
    # When ten chunks arrive in one fetch
    _deliver(on_message, TASK_TRAIN_BATCH, [f"c{i}" for i in range(10)])
    # Then full jobs go at once, and the rest on the event loop's next turn, without waiting
    assert jobs == [["c0", "c1", "c2", "c3"], ["c4", "c5", "c6", "c7"]]
    assert [e.secs for e in timer.entries if not e.cancelled] == [0.0]
    timer.fire()
    assert jobs[2:] == [["c8", "c9"]]
    # And a lone chunk later goes alone, on the next turn
    _deliver(on_message, TASK_TRAIN_BATCH, ["lone"])
    timer.fire()
    assert jobs[3:] == [["lone"]]


def test_train_step_messages_of_one_fetch_go_together() -> None:
    # Given the train_step strategy, its wait taken before the fetch (the fetch window, default)
    on_message, jobs, timer = _strategy(TASK_TRAIN_STEP, buffered=True)
    # When three messages of one fetch arrive
    _deliver(on_message, TASK_TRAIN_STEP, ["s0", "s1", "s2"])
    # Then they go as one job on the loop's next turn, not after another wait
    assert jobs == []
    assert [e.secs for e in timer.entries] == [0.0]
    timer.fire()
    assert jobs == [["s0", "s1", "s2"]]


def test_train_step_messages_wait_for_company_under_the_former_rule(monkeypatch: pytest.MonkeyPatch) -> None:
    # Given the train_step strategy with ITRAIN_BATCH_WAIT_ADAPTIVE=0
    monkeypatch.setenv("ITRAIN_BATCH_WAIT_ADAPTIVE", "0")
    get_settings.cache_clear()
    try:
        on_message, jobs, timer = _strategy(TASK_TRAIN_STEP, buffered=True)
    finally:
        monkeypatch.delenv("ITRAIN_BATCH_WAIT_ADAPTIVE")
        get_settings.cache_clear()
    # When three messages arrive
    _deliver(on_message, TASK_TRAIN_STEP, ["s0", "s1", "s2"])
    # Then they wait ITRAIN_BATCH_WAIT_MS for others, and go as one job
    assert jobs == []
    assert [e.secs for e in timer.entries] == [get_settings().batch_wait_ms / 1000.0]
    timer.fire()
    assert jobs == [["s0", "s1", "s2"]]
