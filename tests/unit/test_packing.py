"""``producer.packing``: hiredis packs a command as redis-py's own packer does, and whatever it
would not take as redis-py does goes redis-py's way, with redis-py's errors."""

from __future__ import annotations

from typing import Any

import pytest
import redis
from redis.connection import HiredisRespSerializer, PythonRespSerializer
from redis.exceptions import DataError

from producer.demotion import DemotionAwareConnection
from producer.packing import HiredisPacker


def _redis_py() -> HiredisRespSerializer:
    encoder = redis.Connection().encoder
    return HiredisRespSerializer(PythonRespSerializer(6000, encoder.encode).pack, encoder.encode)


@pytest.mark.parametrize(
    "args",
    [
        ("SET", "key", "value"),
        ("EVALSHA", "a" * 40, 2, "k1", "k2", 1.5, 0.1, 1e300, -3, 2**70, b"\x00\xffbytes", "h\u00e9"),
        (b"GET", b"key"),
        ("SET", "k", memoryview(b"view")),
        ("SCRIPT LOAD", "return 1"),
        ("CLIENT SETINFO", "LIB-NAME", "x"),
        ("ZADD", "z", 1765000000.123456, "member"),
    ],
)
def test_packs_the_same_bytes_as_redis_py(args: tuple[Any, ...]) -> None:
    ours = b"".join(HiredisPacker(_redis_py()).pack(*args))
    theirs = b"".join(_redis_py().pack(*args))
    assert ours == theirs


@pytest.mark.parametrize("bad", [True, None, [1, 2], {"a": 1}])
def test_refuses_what_redis_py_refuses_with_its_error(bad: Any) -> None:
    with pytest.raises(DataError) as ours:
        HiredisPacker(_redis_py()).pack("SET", "k", bad)
    with pytest.raises(DataError) as theirs:
        _redis_py().pack("SET", "k", bad)
    assert str(ours.value) == str(theirs.value)


def test_the_project_connections_use_it_with_utf8_and_not_otherwise() -> None:
    assert isinstance(DemotionAwareConnection()._command_packer, HiredisPacker)
    latin = DemotionAwareConnection(encoding="latin-1")
    assert not isinstance(latin._command_packer, HiredisPacker)
    assert b"".join(latin._command_packer.pack("SET", "k", "\u00e9")).endswith(b"\xe9\r\n")
