"""Message decoding rules that need no Redis: task ids, and bodies orjson refuses."""

from __future__ import annotations

import orjson
import pytest

from producer.errors import InvalidEventError
from producer.protocol import TASK_TRAIN_BATCH
from worker.consume.messages import (
    TASK_ID_MAX,
    RawMessage,
    check_task_id,
    decode_args,
    plain_ids,
    printable,
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
