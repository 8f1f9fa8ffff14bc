"""``Sender``: one Redis command over a held connection, without redis-py's per-call machinery.

``redis.Redis.lpush`` costs the caller ~85-110 µs of CPU a call (redis-py 8: a connection taken
from and given back to the pool under its lock, the retry wrapper, connection-state metrics),
against ~20 µs for packing the command, ``sendall`` and reading the reply on a connection kept
at hand. ``train_step`` is one such command per event, so that difference is most of its cost.

Connections are made from the client's pool settings (URL, password, TLS, timeouts), kept in a
free list (``list.pop``/``append`` are atomic, so any thread may take one) and reconnected by
redis-py on next use after an error. A forked child forgets the parent's connections (their
sockets are the parent's) and makes its own.
"""

from __future__ import annotations

import os
import weakref
from typing import Any

import redis

from producer.demotion import refuses_writes
from producer.demotion import stale as demotion_stale

__all__ = ["Sender"]


class Sender:
    """Sends single commands for ``client``'s Redis; as many connections as concurrent callers."""

    def __init__(self, client: redis.Redis) -> None:
        self._pool = client.connection_pool
        #: A sentinel URL's pool tells when a connection's server is no longer the master.
        self._stale = getattr(self._pool, "stale", None)
        # redis-py's Connection methods carry no type hints.
        self._idle: list[Any] = []
        _live.add(self)

    def execute(self, *args: Any) -> Any:
        """The reply to one command; Redis errors (``OutOfMemoryError``...) and connection errors
        are raised as redis-py raises them."""
        conn = self._take()
        try:
            self._connect(conn)
            conn.send_packed_command([_pack(args)])
            reply = conn.read_response()
        except redis.ResponseError as exc:
            if refuses_writes(exc):
                # A server that cannot take writes now (when the connection class let the reply
                # through): connect afresh next time, maybe to another master.
                conn.disconnect()
            self._idle.append(conn)  # a reply was read in full: the connection is in step
            raise
        except BaseException:
            # Unknown state (half a reply, a timeout): start afresh; redis-py reconnects on use.
            conn.disconnect()
            self._idle.append(conn)
            raise
        self._idle.append(conn)
        return reply

    def execute_all(self, *commands: tuple[Any, ...], raise_on_error: bool = True) -> list[Any]:
        """The replies to several commands sent together on one connection (one write, one
        round trip): ``WAIT`` after a push counts that connection's writes only. A command Redis
        refuses raises its error once every reply is read (or, without ``raise_on_error``, is
        its reply); connection errors as ``execute``."""
        conn = self._take()
        replies: list[Any] = []
        refused: redis.ResponseError | None = None
        try:
            self._connect(conn)
            conn.send_packed_command([b"".join(_pack(args) for args in commands)])
            for _ in commands:
                try:
                    replies.append(conn.read_response())
                except redis.ResponseError as exc:
                    refused = refused or exc
                    replies.append(exc)
        except BaseException:
            conn.disconnect()
            self._idle.append(conn)
            raise
        if refused is not None and refuses_writes(refused):
            conn.disconnect()
        self._idle.append(conn)  # every reply was read in full: the connection is in step
        if refused is not None and raise_on_error:
            raise refused
        return replies

    def _take(self) -> Any:
        try:
            return self._idle.pop()
        except IndexError:
            return self._pool.connection_class(**self._pool.connection_kwargs)

    def _connect(self, conn: Any) -> None:
        """Connect ``conn`` as the pool would, before anything is sent on it: a sentinel-managed
        connection asks the sentinels for the master here (sending on an unconnected one would go
        to its last address, or to localhost:6379 the first time), and one whose server the
        sentinels no longer name, or made before a master was demoted (``producer.demotion``), is
        dropped first."""
        if demotion_stale(conn) or (self._stale is not None and self._stale(conn)):
            conn.disconnect()
        if conn._sock is None:
            conn.connect()

    def close(self) -> None:
        while self._idle:
            self._idle.pop().disconnect()

    def _forget(self) -> None:
        # In a forked child: dropped, not disconnected (redis-py shuts a socket down only in the
        # process that opened it, and closing our copy of the descriptor leaves the parent's).
        self._idle = []


def _pack(args: tuple[Any, ...]) -> bytes:
    """A command in RESP, Redis's wire format (half the time of redis-py's packer)."""
    out = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if type(arg) is bytes else str(arg).encode()
        out += (b"$%d\r\n" % len(data), data, b"\r\n")
    return b"".join(out)


_live: weakref.WeakSet[Sender] = weakref.WeakSet()


def _after_fork() -> None:
    for sender in list(_live):
        sender._forget()


os.register_at_fork(after_in_child=_after_fork)
