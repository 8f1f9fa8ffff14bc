"""A TCP forwarder in front of a Redis: a stable address, a network delay, a partition.

- **Stable address**: new connections go to the current target; ``switch(port)`` sends the next
  ones elsewhere while connections made before stay with the server they reached (as behind a
  managed service's DNS name after a failover), unless ``cut=True`` ends them (as a proxy or load
  balancer that resets its connections on failover does).
- **Delay**: ``delay_ms`` one way, in each direction, as a delay line (``delay_line.py``): every
  chunk leaves at its arrival plus the delay, in order, without limiting bandwidth or serializing
  connections. With ``delay_ms = X/2`` a client sees a round trip of X ms more than direct: a
  worker "on another host" (``tc netem`` needs a kernel module that our machines do not have).
- **Partition**: ``hold()`` stops passing bytes both ways without closing any connection (nothing
  is read, so the senders' kernel buffers fill as on a dead link); ``resume()`` lets everything
  that waited go on, in order.

In-process: ``Forwarder(target_port, delay_ms=...)`` runs an asyncio loop in a thread of its own.
As a process, so that its CPU can be measured apart from its clients'::

    python -m worker.devtools.forwarder --target-port P [--delay-ms D] [--port L]

prints the port it listens on (one line) and runs until SIGTERM or SIGINT; SIGUSR1 holds,
SIGUSR2 resumes.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Coroutine
from typing import Any

from worker.devtools.delay_line import EOF, DelayLine

__all__ = ["Forwarder", "ForwarderCore", "main"]


class _Side(asyncio.Protocol):
    """One socket of a link: what it reads goes into ``out``; what ``into`` carries is written to it."""

    def __init__(self, link: _Link, out: DelayLine, into: DelayLine) -> None:
        self.link = link
        self.out = out
        self.into = into
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.sink_full = False  # the peer's write buffer is over its high-water mark
        self.ended = False  # this side's stream end is in ``out``

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.into.attach(transport)
        self.update_reading()

    def data_received(self, data: bytes) -> None:
        self.out.push(data)

    def eof_received(self) -> bool:
        self._end()
        return True  # keep the socket open for what the other side still sends (a half-close)

    def connection_lost(self, exc: Exception | None) -> None:
        self._end()

    def _end(self) -> None:
        if not self.ended:
            self.ended = True
            self.out.push(EOF)

    def pause_writing(self) -> None:
        # Our socket cannot take more: stop reading the side that feeds it (TCP back-pressure).
        if self.peer is not None:
            self.peer.sink_full = True
            self.peer.update_reading()

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.sink_full = False
            self.peer.update_reading()

    def update_reading(self) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self.sink_full or self.link.core.held:
            if transport.is_reading():
                transport.pause_reading()
        elif not transport.is_reading():
            transport.resume_reading()


class _Link:
    """A client's connection and the one made for it to the target."""

    def __init__(self, core: ForwarderCore) -> None:
        self.core = core
        loop = core.loop
        self.up = DelayLine(loop, core.delay, self._line_ended)  # client -> server
        self.down = DelayLine(loop, core.delay, self._line_ended)  # server -> client
        self._ended_lines = 0
        if core.held:
            self.up.hold()
            self.down.hold()
        self.client = _Side(self, self.up, self.down)
        self.server = _Side(self, self.down, self.up)
        self.client.peer, self.server.peer = self.server, self.client

    def sides(self) -> tuple[_Side, _Side]:
        return self.client, self.server

    def lines(self) -> tuple[DelayLine, DelayLine]:
        return self.up, self.down

    async def connect(self, host: str, port: int) -> None:
        try:
            await self.core.loop.create_connection(lambda: self.server, host, port)
        except OSError:
            self.abort()

    def _line_ended(self) -> None:
        # Both streams have ended and their ends were delivered: nothing left to carry.
        self._ended_lines += 1
        if self._ended_lines == 2:
            self.close()

    def abort(self) -> None:
        """End both sockets now (their peers see the stream end), dropping what is in flight."""
        for line in self.lines():
            line.close()
        for side in self.sides():
            if side.transport is not None:
                side.transport.abort()
        self.core.links.discard(self)

    def close(self) -> None:
        for line in self.lines():
            line.close()
        for side in self.sides():
            if side.transport is not None:
                side.transport.close()
        self.core.links.discard(self)


class ForwarderCore:
    """The forwarder itself, on one asyncio loop: every method runs in that loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop, target_port: int, delay_ms: float, target_host: str):
        if delay_ms < 0:
            raise ValueError(f"delay_ms must be >= 0, got {delay_ms}")
        self.loop = loop
        self.target_host = target_host
        self.target_port = target_port
        self.delay = delay_ms / 1000.0
        self.held = False
        self.links: set[_Link] = set()
        self.accepted = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def listen(self, host: str, port: int) -> int:
        self._server = await self.loop.create_server(self._accept, host, port)
        return int(self._server.sockets[0].getsockname()[1])

    def _accept(self) -> asyncio.Protocol:
        link = _Link(self)
        self.links.add(link)
        self.accepted += 1
        # The target is read when the client arrives: a ``switch`` moves only later connections.
        task = self.loop.create_task(link.connect(self.target_host, self.target_port))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return link.client

    def switch(self, target_port: int, cut: bool) -> None:
        self.target_port = target_port
        if cut:
            for link in list(self.links):
                link.abort()

    def hold(self) -> None:
        self.held = True
        for link in self.links:
            for line in link.lines():
                line.hold()
            for side in link.sides():
                side.update_reading()

    def resume(self) -> None:
        self.held = False
        for link in list(self.links):
            for line in link.lines():
                line.release()
            for side in link.sides():
                side.update_reading()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for link in list(self.links):
            link.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._server is not None:
            await self._server.wait_closed()


class Forwarder:
    """The forwarder in a thread of this process: listens on ``host`` (127.0.0.1) at ``port``
    (0: a free one), forwards to ``target_host``:``target_port`` with ``delay_ms`` one way."""

    def __init__(
        self,
        target_port: int,
        *,
        delay_ms: float = 0.0,
        target_host: str = "127.0.0.1",
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        if delay_ms < 0:
            raise ValueError(f"delay_ms must be >= 0, got {delay_ms}")
        self.host = host
        self._loop = asyncio.new_event_loop()
        self._core = ForwarderCore(self._loop, target_port, delay_ms, target_host)
        self._thread = threading.Thread(target=self._loop.run_forever, name="forwarder", daemon=True)
        self._thread.start()
        self._closed = False
        try:
            self.port = self._call(self._core.listen(host, port))
        except BaseException:
            self._stop_loop()
            raise

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def target_port(self) -> int:
        return self._core.target_port

    @property
    def delay_ms(self) -> float:
        return self._core.delay * 1000.0

    @property
    def connections(self) -> int:
        """Client connections open now."""
        return int(self._run(lambda: len(self._core.links)))

    @property
    def accepted(self) -> int:
        """Client connections accepted since the start."""
        return self._core.accepted

    def switch(self, target_port: int, *, cut: bool = False) -> None:
        """Send connections made from now on to ``target_port``; with ``cut``, also end every
        connection made before (both sides see the stream end)."""
        self._run(lambda: self._core.switch(target_port, cut))

    def hold(self) -> None:
        """Stop passing bytes in both directions, every connection left open (a partition)."""
        self._run(self._core.hold)

    def resume(self) -> None:
        """Pass bytes again: what waited goes on, in order."""
        self._run(self._core.resume)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(Exception):
            self._call(self._core.close())
        self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        if not self._thread.is_alive():
            self._loop.close()

    def _call(self, coro: Coroutine[Any, Any, Any]) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    def _run(self, fn: Callable[[], Any]) -> Any:
        async def call() -> Any:
            return fn()

        return self._call(call())

    def __enter__(self) -> Forwarder:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m worker.devtools.forwarder",
        description="Forward TCP to a target with a one-way delay; prints the port it listens on.",
    )
    parser.add_argument("--target-port", type=int, required=True, help="the port to forward to")
    parser.add_argument("--target-host", default="127.0.0.1")
    parser.add_argument("--delay-ms", type=float, default=0.0, help="one-way delay in each direction, ms")
    parser.add_argument("--host", default="127.0.0.1", help="the address to listen on")
    parser.add_argument("--port", type=int, default=0, help="the port to listen on (0: a free one)")
    args = parser.parse_args(argv)
    if args.delay_ms < 0:
        parser.error(f"--delay-ms must be >= 0, got {args.delay_ms}")
    if not 0 < args.target_port < 65536:
        parser.error(f"--target-port must be a port number (1-65535), got {args.target_port}")
    return args


async def _serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    core = ForwarderCore(loop, args.target_port, args.delay_ms, args.target_host)
    port = await core.listen(args.host, args.port)
    print(port, flush=True)
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGUSR1, core.hold)
    loop.add_signal_handler(signal.SIGUSR2, core.resume)
    await stop.wait()
    await core.close()


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    try:
        asyncio.run(_serve(args))
    except OSError as exc:
        print(f"forwarder: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
