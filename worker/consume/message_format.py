"""Admission of a message by its format: a worker refuses one newer than it reads.

The format comes from the message's ``itrain_format`` header (``producer.formats``), read in the
main process when the message arrives (``RawMessage.message_format``). A message this release
cannot read is refused whole in admission: a FAILURE naming both versions under its task id
(``MessageFormatError``), one dead letter, nothing of it trained, and the message acknowledged,
so it is answered once instead of coming back on every delivery. Its neighbours in the same pool
job train as usual.
"""

from __future__ import annotations

from typing import Any

from producer.errors import MessageFormatError
from producer.formats import check_message_format
from producer.protocol import TASK_TRAIN_BATCH
from worker.consume.messages import RawMessage, decode_args, split_batch

__all__ = ["refused_format"]


def refused_format(msg: RawMessage, max_bytes: int) -> tuple[MessageFormatError, Any] | None:
    """``None`` when this worker reads ``msg``'s format; else the error to answer it with and its
    first event as far as the old rules read it (to route the dead letter to its model), or
    ``None`` when they do not."""
    try:
        check_message_format(msg.message_format)
    except MessageFormatError as exc:
        return exc, _first_payload(msg, max_bytes)
    return None


def _first_payload(msg: RawMessage, max_bytes: int) -> Any:
    # A newer format may mean a body this release does not understand: any error here only
    # means the dead letter goes to the default model's list.
    try:
        args = decode_args(msg, max_bytes)
        pairs = split_batch(args, msg.task_id) if msg.task == TASK_TRAIN_BATCH else [(msg.task_id, args[0])]
        return pairs[0][1] if pairs else None
    except Exception:
        return None
