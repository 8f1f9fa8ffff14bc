"""What the producer sends, without Redis: ids, the envelope template, and validated events
sent as the caller gave them (the worker must read them back as the same event)."""

from __future__ import annotations

import os
import time
import uuid
from datetime import UTC, datetime, timedelta, timezone
from zoneinfo import ZoneInfo

import orjson
import pytest
import redis
from pydantic import ValidationError

from producer.client import TrainingClient
from producer.enqueue_time import ENQUEUED_HEADER, enqueued_at
from producer.events import EVENT_LIST, InteractionData, check_dict, check_dicts
from producer.outgoing import event_json, payloads
from producer.protocol import (
    TASK_TRAIN_BATCH,
    TASK_TRAIN_STEP,
    EnvelopeTemplate,
    batch_budget,
    encode_envelope,
    event_weight,
    new_task_id,
)
from producer.sender import _pack
from producer.settings import Settings
from tests.helpers import make_event, make_events


def test_task_ids_are_uuid4_text_and_unique() -> None:
    ids = [new_task_id() for _ in range(10_000)]
    assert len(set(ids)) == len(ids)
    for i in ids[:100]:
        parsed = uuid.UUID(i)
        assert str(parsed) == i
        assert parsed.version == 4
        assert parsed.variant == uuid.RFC_4122


# Python 3.12+ warns on fork() in a process with threads; the child does its part and exits at once.
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_task_ids_differ_in_a_forked_child() -> None:
    # Given a process that has made ids
    before = new_task_id()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next id, then leave at once
        os.write(write, new_task_id().encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 100).decode()
    os.close(read)
    os.waitpid(pid, 0)
    # Then the child's ids do not continue the parent's sequence
    ours = new_task_id()
    assert child[:23] != ours[:23]
    assert len({before, child, ours}) == 3


@pytest.mark.parametrize("task", [TASK_TRAIN_STEP, TASK_TRAIN_BATCH])
@pytest.mark.parametrize("ignore_result", [False, True])
@pytest.mark.parametrize("argsrepr", ['[{event_id: "x\\\\y", model: m}]', None])
def test_envelope_template_is_encode_envelope(task: str, ignore_result: bool, argsrepr: str | None) -> None:
    # Given a template and the same message built by encode_envelope
    queue = 'q"ueue'
    args = [[{"event_id": "é\n", "n": 1}], ["a"]]
    task_id = new_task_id()
    when = 1_765_000_000.123456
    filled = EnvelopeTemplate(task, queue, ignore_result=ignore_result).fill(
        task_id, orjson.dumps(args), argsrepr, enqueued_at=when
    )
    built = encode_envelope(
        task, task_id, args, queue, argsrepr=argsrepr, ignore_result=ignore_result, enqueued_at=when
    )
    # Then both are the same message but for the delivery tag, unique to each
    assert orjson.loads(filled)["headers"]["itrain_enqueued_at"] == when
    a, b = orjson.loads(filled), orjson.loads(built)
    tag = a["properties"].pop("delivery_tag")
    b["properties"].pop("delivery_tag")
    assert a == b
    assert uuid.UUID(tag).version == 4


AS_GIVEN = [
    pytest.param({}, id="plain"),
    pytest.param({"timestamp": datetime(2024, 3, 1, 8, 30)}, id="naive-datetime"),
    pytest.param(
        {"timestamp": datetime(2024, 3, 1, 10, 30, tzinfo=timezone(timedelta(hours=2)))}, id="aware-datetime"
    ),
    pytest.param({"timestamp": datetime(2024, 3, 1, 10, 30, tzinfo=ZoneInfo("Europe/Paris"))}, id="zoneinfo"),
    pytest.param({"timestamp": "1700000000.5"}, id="epoch-string"),
    pytest.param({"timestamp": "2024-03-01T08:30:00+05:00"}, id="iso-string"),
    pytest.param({"label": [0.0, 1, 0.25]}, id="label-list"),
    pytest.param({"context": {"k": 2**63 - 1, "f": 0.5, "b": True, "s": ""}}, id="context-limits"),
]


@pytest.mark.parametrize("overrides", AS_GIVEN)
def test_plain_dict_is_sent_as_given_and_read_back_the_same(overrides: dict[str, object]) -> None:
    # Given a valid plain dict event
    event = make_event(**overrides)
    # When the client turns it into what it sends
    data, _ = event_json(event)
    (listed,), _ = payloads([event])
    # Then a train_many chunk carries the caller's own object (no model_dump), and a train_step
    # message exactly the model's JSON form (the contract's argument of itrain.train_step) ...
    assert listed is event
    assert orjson.loads(data) == InteractionData.model_validate(event).model_dump(mode="json")
    # ... and the worker, validating the JSON, reads the same event as the producer did
    assert InteractionData.model_validate(orjson.loads(data)) == InteractionData.model_validate(event)


def test_missing_event_id_is_filled_in_by_the_producer_without_touching_the_callers_dict() -> None:
    # Given events without an event id
    event = make_event()
    del event["event_id"]
    original = dict(event)
    # When they are made ready to send
    _, payload = event_json(event)
    many, _ = payloads([event, event])
    # Then each got its own id (a retry of the same payload de-duplicates), the caller's dict unchanged
    ids = [payload["event_id"], many[0]["event_id"], many[1]["event_id"]]
    assert len(set(ids)) == 3
    assert all(uuid.UUID(i).version == 4 for i in ids)
    assert event == original


@pytest.mark.parametrize(
    "overrides",
    [
        pytest.param({"user_id": b"user-bytes"}, id="bytes"),
        pytest.param({"timestamp": datetime(2024, 3, 1, tzinfo=UTC).date()}, id="date"),
    ],
)
def test_values_json_would_change_are_sent_in_the_models_form(overrides: dict[str, object]) -> None:
    # Given a valid event with a value orjson cannot encode, or encodes as something else
    event = make_event(**overrides)
    try:
        model = InteractionData.model_validate(event)
    except ValidationError:
        pytest.skip("this pydantic refuses the value")
    # When it is made ready to send
    data, _ = event_json(event)
    (listed,), _ = payloads([event])
    # Then the model's JSON form is sent, which reads back as the same event
    expected = model.model_dump(mode="json")
    assert orjson.loads(data) == expected
    assert listed == expected
    assert InteractionData.model_validate(orjson.loads(data)) == model


def test_models_and_dicts_mix() -> None:
    # Given dict events and a model among them
    events: list[object] = list(make_events("default", 4))
    events[1] = InteractionData.model_validate(events[1])
    # When they are made ready to send, then each reads back as the same event
    out, encoded = payloads(events)  # type: ignore[arg-type]
    assert [orjson.loads(e) for e in encoded] == [orjson.loads(orjson.dumps(o)) for o in out]
    assert [InteractionData.model_validate(orjson.loads(orjson.dumps(o))) for o in out] == [
        InteractionData.model_validate(e) for e in events
    ]


_BASE = {"user_id": "u1", "action_type": "click", "timestamp": 1_700_000_000}
VERDICTS = [
    {},
    {"event_id": "x" * 129},
    {"event_id": ""},
    {"event_id": 42},
    {"user_id": ""},
    {"user_id": "u" * 257},
    {"user_id": 123},
    {"action_type": "a" * 65},
    {"timestamp": float("nan")},
    {"timestamp": -1},
    {"timestamp": True},
    {"timestamp": 1e13},
    {"timestamp": 0},
    {"timestamp": -0.0},
    {"timestamp": 253_402_300_799},
    {"timestamp": 253_402_300_799.5},
    {"timestamp": 10**400},
    {"timestamp": float("inf")},
    {"timestamp": "not a time"},
    {"timestamp": None},
    {"timestamp": "-86400.5"},
    {"timestamp": "0001-01-01T00:00:00+01:00"},
    {"timestamp": "9999-12-31T23:59:59-01:00"},
    {"timestamp": datetime(2024, 1, 1)},
    {"context": None},
    {"context": {}},
    {"context": {f"k{i}": i for i in range(65)}},
    {"context": {"": 1}},
    {"context": {"k" * 65: 1}},
    {"context": {"k": "v" * 257}},
    {"context": {"k": [1, 2]}},
    {"context": {"k": 2**63}},
    {"context": {"k": float("inf")}},
    {"label": 1},
    {"label": [0.0, 1.0]},
    {"label": []},
    {"label": [0.5] * 65},
    {"label": ["0.5"]},
    {"label": 1.5},
    {"model": "has space"},
    {"model": "x" * 65},
    {"extra": 1},
]


@pytest.mark.parametrize("overrides", VERDICTS, ids=[str(i) for i in range(len(VERDICTS))])
def test_dict_check_agrees_with_the_model(overrides: dict[str, object]) -> None:
    """The producer checks plain dicts without building a model: the same verdict, the same
    error locations and types, for one event and in a list."""
    event = {**_BASE, **overrides}

    def errors(check: object) -> list[tuple[object, ...]] | None:
        try:
            check()  # type: ignore[operator]
        except ValidationError as exc:
            return [(e["loc"], e["type"]) for e in exc.errors()]
        return None

    assert errors(lambda: check_dict(event)) == errors(lambda: InteractionData.model_validate(event))
    assert errors(lambda: check_dicts([_BASE, event])) == errors(
        lambda: EVENT_LIST.validate_python([_BASE, event])
    )


def test_dict_check_errors_read_as_the_models() -> None:
    with pytest.raises(ValidationError, match="1 validation error for InteractionData"):
        event_json({**_BASE, "timestamp": -1})


def test_invalid_event_raises_validation_error_naming_the_index() -> None:
    events = make_events("default", 3)
    events[2]["timestamp"] = -5
    with pytest.raises(ValidationError, match=r"2\.timestamp"):
        payloads(events)
    with pytest.raises(ValidationError, match=r"timestamp"):
        event_json(events[2])


@pytest.mark.parametrize(
    "args",
    [("LPUSH", "itrain", b"x" * 1300), ("LLEN", "é-queue"), ("SET", "k", 5), ("LPUSH", "q", b"\x00\r\n")],
)
def test_sender_packs_commands_as_redis_py_does(args: tuple[object, ...]) -> None:
    assert _pack(args) == b"".join(redis.Connection().pack_command(*args))


def _cut_by_weight(encoded: list[bytes], chunk_size: int, max_bytes: int) -> list[tuple[int, int]]:
    """The rule of ``Outgoing.chunks``, event by event: at most ``chunk_size`` events and
    ``batch_budget`` bytes of weight a chunk."""
    limit = batch_budget(max_bytes)
    bounds, start, size = [], 0, 0
    for i, data in enumerate(encoded):
        weight = event_weight(data, max_bytes)
        if i > start and (i - start >= chunk_size or size + weight > limit):
            bounds.append((start, i))
            start, size = i, 0
        size += weight
    bounds.append((start, len(encoded)))
    return bounds


@pytest.mark.parametrize("chunk_size", [1, 3, 256])
@pytest.mark.parametrize("max_bytes", [1024, 4096, 1_048_576])
@pytest.mark.parametrize("sizes", [[10] * 700, [10, 800, 10, 10, 300] * 40, [10] * 5 + [860]])
def test_chunks_cut_as_the_weight_rule_does(chunk_size: int, max_bytes: int, sizes: list[int]) -> None:
    """Chunks of equal size where no chunk can reach the byte budget, by weight otherwise: the
    same bounds as weighing each event."""
    # Given events of these JSON sizes and a client with these limits
    encoded = [b"x" * n for n in sizes]
    client = TrainingClient(
        settings=Settings(
            redis_url="redis://127.0.0.1:1/0", chunk_size=chunk_size, max_message_bytes=max_bytes
        )
    )
    # When they are cut into chunks, then the bounds are those of the weight rule
    assert client._outgoing.chunks(encoded) == _cut_by_weight(encoded, chunk_size, max_bytes)
    client.close()


def test_messages_carry_their_enqueue_time_in_a_header() -> None:
    # Given a message filled now, and one filled without a time (it takes the clock's)
    before = time.time()
    template = EnvelopeTemplate(TASK_TRAIN_STEP, "itrain")
    headers = orjson.loads(template.fill(new_task_id(), b"[{}]"))["headers"]
    built = orjson.loads(encode_envelope(TASK_TRAIN_STEP, new_task_id(), [{}], "itrain"))["headers"]
    after = time.time()
    # Then each carries when it was made, and the worker's reader takes it
    for h in (headers, built):
        assert before <= h[ENQUEUED_HEADER] <= after
        assert enqueued_at(h) == h[ENQUEUED_HEADER]


@pytest.mark.parametrize(
    "value", [None, "1765000000", True, float("nan"), float("inf"), 1_765_000_000_000, -5, 0]
)
def test_an_enqueue_time_that_is_not_a_time_is_read_as_absent(value: object) -> None:
    # Given a header that is absent, text, a boolean, not finite, in milliseconds or negative
    headers = {} if value is None else {ENQUEUED_HEADER: value}
    # Then the worker reads no enqueue time from it (the message counts from first sight)
    assert enqueued_at(headers) is None
