"""Whose fault is an error: the message's, or Redis's?

A worker must tell the two apart. An error that belongs to an item (it cannot be decoded, it is
invalid, it has no target, its update is non-finite, our code trips over it in any other way)
comes back on every delivery: the item ends as FAILURE with a dead letter and its message is
acknowledged, or it would be requeued forever. An error that belongs to Redis (unreachable, out of
memory, read-only replica, loading, busy with a script, a script cache emptied by a restart) says
nothing about the message: it goes back to the queue, and is neither answered nor dead-lettered.
"""

from __future__ import annotations

import builtins

import redis.exceptions as rex

from producer.errors import ItrainError, ReplicationError

__all__ = ["REDIS_FAULT_PREFIXES", "is_redis_fault"]

#: Error replies that say Redis cannot serve now, whatever the command. redis-py 8.1 maps some of
#: them to classes (OOM, READONLY, LOADING, NOSCRIPT, MASTERDOWN, CLUSTERDOWN, TRYAGAIN) and strips
#: the code from the message; the rest (BUSY, MISCONF, NOREPLICAS) arrive as a plain
#: ``ResponseError`` whose text starts with the code.
REDIS_FAULT_PREFIXES = (
    "BUSY ",  # a script or module command is running too long
    "CLUSTERDOWN ",
    "LOADING ",
    "MASTERDOWN ",
    "MISCONF ",  # RDB snapshots failing: Redis refuses writes
    "NOREPLICAS ",  # min-replicas-to-write not met
    "NOSCRIPT ",
    "OOM ",
    "READONLY ",
    "TRYAGAIN ",
)

_FAULT_CLASSES: tuple[type[BaseException], ...] = (
    rex.ConnectionError,  # also BusyLoadingError (LOADING), AuthenticationError, MaxConnectionsError
    rex.TimeoutError,
    rex.OutOfMemoryError,
    rex.ReadOnlyError,
    rex.NoScriptError,
    rex.ClusterDownError,  # also MasterDownError
    rex.TryAgainError,
    # The socket below redis-py, when an error escapes unwrapped (a TLS handshake, a reset).
    builtins.ConnectionError,
    # Too few replicas acknowledged a commit or results (ITRAIN_MIN_REPLICAS): not acked.
    ReplicationError,
)


def is_redis_fault(exc: BaseException) -> bool:
    """True when ``exc`` (or an error it was raised from) says Redis could not serve the request.

    Such an error is not the message's fault: the message goes back to the queue. Everything else
    raised while handling an item is the item's fault.
    """
    seen = 0
    current: BaseException | None = exc
    # Follow explicit ``raise ... from`` wrapping a few levels: our code may wrap a Redis error.
    while current is not None and seen < 8:
        if _is_fault(current):
            return True
        current = current.__cause__
        seen += 1
    return False


def _is_fault(exc: BaseException) -> bool:
    if isinstance(exc, _FAULT_CLASSES):
        return True
    if isinstance(exc, builtins.TimeoutError) and not isinstance(exc, ItrainError):
        return True  # a socket timeout (not our own ResultTimeoutError)
    # Redis 7 keeps the code of an error raised inside a Lua script ("OOM ... script: <sha>").
    return isinstance(exc, rex.ResponseError) and str(exc).startswith(REDIS_FAULT_PREFIXES)
