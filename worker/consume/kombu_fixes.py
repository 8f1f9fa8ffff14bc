"""Three guards on kombu's Redis transport, installed when the worker app is imported.

1. A broker loss must not stop the worker. After Redis goes away, Celery closes the broken
   connection; kombu's channel then tries to give the worker's unacknowledged messages back to
   Redis through a transport that is already closed and raises ``AttributeError``, which Celery
   treats as unrecoverable: the worker exits. Those messages are safe in Redis's ``unacked``
   hash and come back after ``ITRAIN_VISIBILITY_TIMEOUT``, so a failed give-back is only logged.
2. Compressed messages are refused (JSON only), but kombu inflates a body whose message has a
   ``compression`` header before any of the worker's code sees it: a zlib bomb inflates in the
   worker's memory, and a body that does not inflate is dropped by Celery with no result. The
   worker leaves bodies as they came; ``messages.decode_args`` refuses them by the header.
3. An item on the queue list that is not a message envelope (not JSON, wrong shape) must not stop
   the worker either: kombu raises from its event loop and Celery exits. It is logged and dropped
   (it has no task id to report a result under).
"""

from __future__ import annotations

import logging
from typing import Any

import kombu.message
from kombu.transport import redis as kombu_redis

logger = logging.getLogger("itrain.transport")

# The originals, typed loosely: kombu ships no annotations for them.
_restore_unacked: Any = kombu_redis.QoS.restore_unacked
_brpop_read: Any = kombu_redis.Channel._brpop_read


def _restore_unacked_or_leave(self: Any, client: Any = None) -> Any:
    try:
        return _restore_unacked(self, client)
    except Exception as exc:
        logger.warning(
            "could not give %d unacknowledged message(s) back to the broker (%r); "
            "they return after ITRAIN_VISIBILITY_TIMEOUT",
            len(self._delivered),
            exc,
        )
        self._delivered.clear()
        return None


def _brpop_read_or_drop(self: Any, **options: Any) -> Any:
    try:
        return _brpop_read(self, **options)
    except self.connection_errors:
        raise
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        logger.error("dropped a queue item that is not a message envelope: %r", exc)
        return True


def _leave_compressed(body: Any, content_type: Any) -> Any:
    return body


def install() -> None:
    """Idempotent; called when the worker's Celery app is made."""
    setattr(kombu.message, "decompress", _leave_compressed)  # noqa: B010 - not exported
    setattr(kombu_redis.QoS, "restore_unacked", _restore_unacked_or_leave)  # noqa: B010
    setattr(kombu_redis.Channel, "_brpop_read", _brpop_read_or_drop)  # noqa: B010
