"""``is_redis_fault``: which errors send a message back to the queue (Redis's) and which end an
item (everything else). The real replies (OOM, BUSY, a stopped server) are met in
``tests/integration/test_run_messages.py``; here, each class and reply text redis-py 8.1 produces."""

from __future__ import annotations

import pytest
import redis
import redis.exceptions as rex

from producer.errors import InvalidEventError, ItrainError, ResultTimeoutError
from worker.consume.faults import is_redis_fault


def _wrapped(inner: BaseException) -> BaseException:
    try:
        try:
            raise inner
        except BaseException as exc:
            raise ItrainError("commit failed") from exc
    except ItrainError as outer:
        return outer


@pytest.mark.parametrize(
    "exc",
    [
        redis.ConnectionError("Error 111 connecting"),
        redis.TimeoutError("Timeout reading from socket"),
        rex.BusyLoadingError("Redis is loading the dataset in memory"),
        rex.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."),
        rex.ReadOnlyError("You can't write against a read only replica."),
        rex.NoScriptError("No matching script. Please use EVAL."),
        rex.MasterDownError("Link with MASTER is down"),
        rex.TryAgainError("Multiple keys request during rehashing of slot"),
        rex.AuthenticationError("invalid password"),
        redis.ResponseError(
            "BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSCRIPT."
        ),
        redis.ResponseError(
            "MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist"
        ),
        redis.ResponseError("NOREPLICAS Not enough good replicas to write."),
        TimeoutError("timed out"),  # what socket.timeout is
        ConnectionResetError(104, "Connection reset by peer"),
        _wrapped(redis.ConnectionError("gone")),
    ],
    ids=lambda e: f"{type(e).__name__}:{str(e)[:12]}",
)
def test_redis_faults(exc: BaseException) -> None:
    """Unreachable, out of memory, read-only, loading, busy, script cache lost: Redis's fault."""
    assert is_redis_fault(exc)


@pytest.mark.parametrize(
    "exc",
    [
        OverflowError("date value out of range"),
        TypeError("Integer exceeds 64-bit range"),
        ValueError("BUSY looking, but not a Redis reply"),
        InvalidEventError("invalid event: timestamp: out of range"),
        ResultTimeoutError("3 job(s) still pending"),
        redis.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"),
        redis.ResponseError("ERR user_script:1: Script attempted to access nonexistent global variable"),
        rex.DataError("Invalid input of type: 'dict'"),
        _wrapped(OverflowError("inner")),
    ],
    ids=lambda e: f"{type(e).__name__}:{str(e)[:12]}",
)
def test_item_errors(exc: BaseException) -> None:
    """Anything else, our own code tripping over an input included: the item's fault."""
    assert not is_redis_fault(exc)
