"""The format versions as read from a message's headers and the store's layout key."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from producer.errors import MessageFormatError, StoreLayoutError
from producer.formats import (
    FORMAT_HEADER,
    LAYOUT_ABSENT,
    MESSAGE_FORMAT,
    STORE_LAYOUT,
    UNREADABLE,
    check_layout,
    check_message_format,
    header_format,
    parse_layout,
)
from producer.protocol import TASK_TRAIN_BATCH, TASK_TRAIN_STEP, EnvelopeTemplate, encode_envelope


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({}, 1),
        ({FORMAT_HEADER: None}, 1),
        ({FORMAT_HEADER: 1}, 1),
        ({FORMAT_HEADER: 2}, 2),
        ({FORMAT_HEADER: "2"}, 2),  # another language may send it as text
        ({FORMAT_HEADER: True}, UNREADABLE),
        ({FORMAT_HEADER: 0}, UNREADABLE),
        ({FORMAT_HEADER: -1}, UNREADABLE),
        ({FORMAT_HEADER: 1.0}, UNREADABLE),
        ({FORMAT_HEADER: "1e3"}, UNREADABLE),
        ({FORMAT_HEADER: 10**100}, UNREADABLE),
        ({FORMAT_HEADER: [1]}, UNREADABLE),
    ],
)
def test_header_format(headers: dict[str, Any], expected: int) -> None:
    assert header_format(headers) == expected


def test_a_newer_or_unreadable_message_format_is_refused_naming_both_versions() -> None:
    check_message_format(MESSAGE_FORMAT)
    with pytest.raises(MessageFormatError, match=rf"format {MESSAGE_FORMAT + 1} is newer .*\(format 1\)"):
        check_message_format(MESSAGE_FORMAT + 1)
    with pytest.raises(MessageFormatError, match="not a format version"):
        check_message_format(UNREADABLE)


def test_layout_values() -> None:
    assert parse_layout(None) == LAYOUT_ABSENT == 1
    assert parse_layout(b"2") == 2
    assert parse_layout(b"\xff") == UNREADABLE
    assert check_layout(1, "store") == 1
    assert check_layout(STORE_LAYOUT, "store") == STORE_LAYOUT
    newer = rf"has layout {STORE_LAYOUT + 1}, .*\(layout {STORE_LAYOUT}\)"
    with pytest.raises(StoreLayoutError, match=newer):
        check_layout(STORE_LAYOUT + 1, "store")


@pytest.mark.parametrize("task", [TASK_TRAIN_STEP, TASK_TRAIN_BATCH])
def test_every_envelope_carries_the_format_header(task: str) -> None:
    built = orjson.loads(encode_envelope(task, "id-1", [{}], "itrain"))
    filled = orjson.loads(EnvelopeTemplate(task, "itrain").fill("id-2", b"[{}]", "shown"))
    assert built["headers"][FORMAT_HEADER] == filled["headers"][FORMAT_HEADER] == MESSAGE_FORMAT
