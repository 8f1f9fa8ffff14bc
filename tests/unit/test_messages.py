"""Message decoding rules that need no Redis: task ids, and bodies orjson refuses."""

from __future__ import annotations

from datetime import UTC

import orjson
import pytest

from producer.chunks import handle_id
from producer.errors import InvalidEventError
from producer.events import InteractionData
from producer.protocol import TASK_TRAIN_BATCH
from worker.consume.messages import (
    MAX_BATCH_EVENTS,
    TASK_ID_MAX,
    RawMessage,
    check_task_id,
    decode_args,
    plain_chunk,
    plain_ids,
    printable,
    read_chunk,
    split_batch,
    validate_event,
)


@pytest.mark.parametrize(
    "task_id", ["a", "x" * TASK_ID_MAX, "7d0c7f6e-1c2b-4f7e-9a55-0f1d5b0c8e11", "é-ü-😀"]
)
def test_task_id_valid(task_id: str) -> None:
    assert check_task_id(task_id) == task_id


@pytest.mark.parametrize(
    ("task_id", "cause"),
    [
        ("", "1 to 255"),
        ("x" * (TASK_ID_MAX + 1), "1 to 255"),
        (42, "got int"),
        (None, "got NoneType"),
        ("\ud800", "not valid text"),
        ("ok\udfffok", "not valid text"),
    ],
    ids=["empty", "too-long", "int", "none", "lone-high-surrogate", "lone-low-surrogate"],
)
def test_task_id_invalid_names_the_problem(task_id: object, cause: str) -> None:
    """A ValueError (InvalidEventError) that names what is wrong, never repeating the id."""
    with pytest.raises(InvalidEventError, match=cause) as info:
        check_task_id(task_id, "itrain.train_batch id")
    assert isinstance(info.value, ValueError)
    assert str(info.value).startswith("itrain.train_batch id")


def test_printable_escapes_what_json_cannot_hold() -> None:
    assert printable("\ud800") == "\\ud800"
    assert orjson.dumps(printable("a\udc80b" * 500))
    assert len(printable("x" * 10_000)) == 300
    assert printable(10**5000) == "<int>"


def _batch(body: bytes) -> RawMessage:
    return RawMessage(TASK_TRAIN_BATCH, "chunk", "application/json", "utf-8", None, body)


def test_body_with_lone_surrogate_escape_is_read_item_by_item() -> None:
    """orjson refuses a ``\\ud800`` escape that JSON's grammar allows: the body is still read, so
    only the item holding it fails later."""
    body = b'[[["ok", "\\ud800"], [{"a": 1}, {"b": 2}]], {}, {}]'
    assert decode_args(_batch(body), 1 << 20) == [["ok", "\ud800"], [{"a": 1}, {"b": 2}]]
    # A surrogate encoded as bytes (not UTF-8, but Python reads it back) is read the same way
    encoded = body.replace(b"\\ud800", b"\xed\xa0\x80")
    assert decode_args(_batch(encoded), 1 << 20) == [["ok", "\ud800"], [{"a": 1}, {"b": 2}]]


@pytest.mark.parametrize(
    ("body", "cause"),
    [
        (b'[[["ok"], [{"label": NaN}]], {}, {}]', "NaN or an infinity"),
        (b'[[["ok"], [{"label": 1e400}]], {}, {}]', "NaN or an infinity"),
        (b'[[["ok"], [{"a": "\xff"}]], {}, {}]', "not valid JSON"),
        (b'[[["ok"], [{"a": 1}', "not valid JSON"),
    ],
    ids=["nan", "1e400", "not-utf8", "truncated"],
)
def test_body_still_refused_when_not_json(body: bytes, cause: str) -> None:
    with pytest.raises(InvalidEventError, match=cause):
        decode_args(_batch(body), 1 << 20)


@pytest.mark.parametrize("odd", ["", "x" * (TASK_ID_MAX + 1), "é", "\ud800", 7, None, b"bytes", ["a"]])
def test_plain_ids_only_when_check_task_id_would_pass_each_as_ascii(odd: object) -> None:
    plain = ["a", "x" * TASK_ID_MAX, "7d0c7f6e-1c2b-4f7e-9a55-0f1d5b0c8e11"]
    assert plain_ids(plain)
    assert all(check_task_id(v) == v for v in plain)
    # Anything else takes the one-by-one path (which accepts "é" and refuses the rest).
    assert not plain_ids([*plain, odd])


# -- the chunk form read in one call (read_chunk) --------------------------------------------------

_EMBED = b'{"callbacks":null,"errbacks":null,"chain":null,"chord":null}'


def _event(**fields: object) -> dict[str, object]:
    return {
        "event_id": "e1",
        "user_id": "u1",
        "action_type": "click",
        "timestamp": 1_700_000_000.25,
        **fields,
    }


def _chunk(events: list[bytes], kwargs: bytes = b"{}", embed: bytes = _EMBED) -> RawMessage:
    return _batch(b"[[[" + b",".join(events) + b"]]," + kwargs + b"," + embed + b"]")


def _item_by_item(msg: RawMessage) -> list[InteractionData]:
    """What the general way reads: decode, split, validate each event."""
    return [validate_event(payload) for _, payload in split_batch(decode_args(msg, 1 << 20), msg.task_id)]


def test_read_chunk_reads_the_same_events_as_the_item_by_item_way() -> None:
    """A chunk of valid events, of every kind a field allows, reads as the same events both ways."""
    # Given a chunk of varied valid events
    events = [
        _event(),
        _event(event_id="e2", timestamp=0, context={"page": "home", "n": -(2**63), "f": 0.1, "b": True}),
        _event(event_id="e3", timestamp="2024-03-01T10:30:00+02:00", label=[0.0, 1], model="m-2"),
        _event(event_id="e4", timestamp=253_402_300_799, context=None, label=0.5),
        {"user_id": "u\u00e9\U0001f600", "action_type": "a" * 64, "timestamp": 1.5e9, "event_id": "x" * 128},
    ]
    msg = _chunk([orjson.dumps(e) for e in events])
    # When it is read in one call
    fast = read_chunk(msg, 1 << 20)
    # Then it holds the events the general way reads, each an InteractionData
    assert fast is not None
    assert fast == _item_by_item(msg)
    assert all(type(e) is InteractionData for e in fast)
    assert [e.timestamp.tzinfo for e in fast] == [UTC] * len(events)


@pytest.mark.parametrize(
    "msg",
    [
        pytest.param(_chunk([orjson.dumps(_event(timestamp=-1))]), id="invalid-event"),
        pytest.param(_chunk([orjson.dumps(_event()), orjson.dumps(_event(extra=1))]), id="second-invalid"),
        pytest.param(
            _chunk([orjson.dumps(_event(context={"n": 0})).replace(b'"n":0', b'"n":18446744073709551616')]),
            id="int-beyond-64-bits",
        ),
        pytest.param(
            _chunk([b'{"event_id":"e1","user_id":"\\ud800","action_type":"a","timestamp":1}']), id="surrogate"
        ),
        pytest.param(
            _chunk([b'{"event_id":"e1","user_id":"\xff","action_type":"a","timestamp":1}']), id="not-utf8"
        ),
        pytest.param(
            _chunk([b'{"event_id":"e1","user_id":"u","action_type":"a","timestamp":NaN}']), id="nan"
        ),
        pytest.param(
            _chunk([b'{"event_id":"e1","user_id":"u","action_type":"a","timestamp":1e400}']), id="1e400"
        ),
        pytest.param(_chunk([orjson.dumps(_event())], embed=b'{"chord":NaN}'), id="nan-in-embed"),
        pytest.param(_chunk([orjson.dumps(_event())], kwargs=b'{"x":1}'), id="kwargs"),
        pytest.param(_chunk([]), id="empty"),
        pytest.param(_batch(b'[[["id"], [' + orjson.dumps(_event()) + b"]], {}, {}]"), id="ids-form"),
        pytest.param(_batch(b"[[[" + orjson.dumps(_event()) + b"]], {}, {}"), id="truncated"),
        pytest.param(
            RawMessage(
                TASK_TRAIN_BATCH, "c", "application/x-python-serialize", "utf-8", None, b"[[[]],{},{}]"
            ),
            id="pickle",
        ),
        pytest.param(
            RawMessage(TASK_TRAIN_BATCH, "c", "application/json", "utf-8", "zlib", b"[[[]],{},{}]"), id="zlib"
        ),
        pytest.param(_chunk([orjson.dumps(_event())] * (MAX_BATCH_EVENTS + 1)), id="too-many"),
    ],
)
def test_read_chunk_leaves_anything_else_to_the_item_by_item_way(msg: RawMessage) -> None:
    """Whatever the general way would refuse, or read otherwise, is not read in one call."""
    assert read_chunk(msg, 1 << 20) is None


def test_read_chunk_refuses_a_body_over_the_size_limit() -> None:
    msg = _chunk([orjson.dumps(_event())])
    assert read_chunk(msg, len(msg.body)) is not None
    assert read_chunk(msg, len(msg.body) - 1) is None


@pytest.mark.parametrize("task_id", ["c", "x" * (TASK_ID_MAX - 4), "x" * (TASK_ID_MAX - 3), "é"])
@pytest.mark.parametrize("n", [1, 10, 100, 101])
def test_plain_chunk_is_plain_ids_of_the_chunks_ids(task_id: str, n: int) -> None:
    assert plain_chunk(task_id, n) == plain_ids([handle_id(task_id, i) for i in range(n)])
