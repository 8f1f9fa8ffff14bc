"""The versions of the formats that outlive a process, and the rules that read them.

Three formats are read by a process other than the one that wrote them, possibly of another
release of interaction-trainer:

- the store's layout (checkpoint fields, markers, results, evaluation ring...): its version is the
  value of the key ``itrain:layout``; a store without that key is layout 1, the layout every
  release before the key existed wrote;
- a task message: its version is the ``itrain_format`` header (the contract fixes the
  ``itrain.train_step`` body, so the version cannot go there); a message without it is format 1;
- an exported model file: versioned in its own header (``worker.ops.portable``).

A process refuses a version newer than it knows, with one line naming both: it cannot know what
the newer one means. Layout 2 is layout 1 with the ``itrain:layout`` key itself (written by
``itrain init`` and ``itrain migrate``): every key and field is as layout 1 has it, so a layout-1
store is read as it is, and a worker that predates the key reads a layout-2 store too.

No numpy and no Redis here: producers, the worker and the engine (through the event) import this
module; the store's own check is ``worker.store.layout.check_store_layout``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from producer.errors import MessageFormatError, StoreLayoutError
from producer.keys import LAYOUT

__all__ = [
    "FORMAT_HEADER",
    "LAYOUT_ABSENT",
    "MESSAGE_FORMAT",
    "STORE_LAYOUT",
    "UNREADABLE",
    "check_layout",
    "check_message_format",
    "header_format",
    "parse_layout",
]

#: The message header that carries a message's format version.
FORMAT_HEADER = "itrain_format"
#: The message format this release writes, and the newest it reads.
MESSAGE_FORMAT = 1
#: The store layout this release writes (with ``itrain init`` and ``itrain migrate``), and the
#: newest it reads.
STORE_LAYOUT = 2
#: The layout of a store without an ``itrain:layout`` key.
LAYOUT_ABSENT = 1
#: A version that is there and is not a positive integer (a hostile or broken header or key).
UNREADABLE = 0


def _version(value: Any) -> int:
    """A positive integer version from a header or a key's value; ``UNREADABLE`` otherwise."""
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return UNREADABLE
    if isinstance(value, str) and value.isascii() and value.isdigit() and len(value) <= 9:
        value = int(value)
    # Not bool (a JSON true), not a float, not a huge number.
    return value if type(value) is int and 0 < value < 1_000_000_000 else UNREADABLE


# -- messages -----------------------------------------------------------------------------------


def header_format(headers: Mapping[str, Any]) -> int:
    """A message's format version from its headers: 1 without the header, ``UNREADABLE`` for a
    value that is not a positive integer. Never raises (the worker's main process calls it)."""
    value = headers.get(FORMAT_HEADER)
    return MESSAGE_FORMAT if value is None else _version(value)


def check_message_format(found: int) -> None:
    """``MessageFormatError`` unless this release reads a message of format ``found``."""
    if found == UNREADABLE:
        raise MessageFormatError(
            f"the message's {FORMAT_HEADER} header is not a format version (a positive integer): "
            "message refused"
        )
    if found > MESSAGE_FORMAT:
        raise MessageFormatError(
            f"message format {found} is newer than this worker reads (format {MESSAGE_FORMAT}): "
            "upgrade the workers before the producers"
        )


# -- the store's layout --------------------------------------------------------------------------


def parse_layout(value: Any) -> int:
    """The layout a value of ``itrain:layout`` names (``None``: the key is absent, layout 1)."""
    return LAYOUT_ABSENT if value is None else _version(value)


def check_layout(found: int, where: str) -> int:
    """``found`` when this release reads layout ``found``; else ``StoreLayoutError`` naming
    ``where`` and both versions."""
    if found == UNREADABLE:
        raise StoreLayoutError(f"the {where} has an {LAYOUT} key that is not a layout version")
    if found > STORE_LAYOUT:
        raise StoreLayoutError(
            f"the {where} has layout {found}, newer than this release reads (layout {STORE_LAYOUT}): "
            "upgrade interaction-trainer"
        )
    return found
