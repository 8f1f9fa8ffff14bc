"""A stand-in for a Redis server older than the project needs: it answers ``HELLO`` as Redis
6.2.14 does (RESP2 or RESP3, as the connection asked), ``PING`` with ``PONG`` and anything else
with ``OK``; ``--version`` prints the banner of that version.

Run as a script it is a fake ``redis-server`` binary (``old_redis.py --version``, or
``old_redis.py --port N ...`` to serve until killed); imported, ``serve()`` runs one in a thread.
Standard library only: the script runs under any interpreter.
"""

from __future__ import annotations

import socketserver
import sys
import threading
from typing import BinaryIO

__all__ = ["BANNER", "VERSION", "serve"]

VERSION = "6.2.14"
BANNER = f"Redis server v={VERSION} sha=00000000:0 malloc=jemalloc-5.1.0 bits=64 build=0"


def _read_command(rfile: BinaryIO) -> list[bytes] | None:
    line = rfile.readline()
    if not line:
        return None
    if not line.startswith(b"*"):  # an inline command
        return line.split()
    args = []
    for _ in range(int(line[1:])):
        size = int(rfile.readline()[1:])
        args.append(rfile.read(size + 2)[:-2])
    return args


def _bulk(text: str) -> bytes:
    data = text.encode()
    return b"$%d\r\n%s\r\n" % (len(data), data)


def _hello(proto: int) -> bytes:
    fields = [
        (_bulk("server"), _bulk("redis")),
        (_bulk("version"), _bulk(VERSION)),
        (_bulk("proto"), b":%d\r\n" % proto),
        (_bulk("id"), b":1\r\n"),
        (_bulk("mode"), _bulk("standalone")),
        (_bulk("role"), _bulk("master")),
        (_bulk("modules"), b"*0\r\n"),
    ]
    head = b"%%%d\r\n" % len(fields) if proto == 3 else b"*%d\r\n" % (2 * len(fields))
    return head + b"".join(k + v for k, v in fields)


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        proto = 2
        while (args := _read_command(self.rfile)) is not None:
            name = args[0].upper() if args else b""
            if name == b"HELLO":
                if len(args) > 1:
                    proto = int(args[1])
                reply = _hello(proto)
            elif name == b"PING":
                reply = b"+PONG\r\n"
            else:
                reply = b"+OK\r\n"
            self.wfile.write(reply)
            self.wfile.flush()
            if name == b"QUIT":
                return


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


def serve(port: int = 0) -> tuple[socketserver.ThreadingTCPServer, int]:
    """A server on 127.0.0.1 (``port`` 0: a free one) in a daemon thread; ``shutdown()`` ends it."""
    server = _Server(("127.0.0.1", port), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, int(server.server_address[1])


def main(argv: list[str]) -> int:
    if "--version" in argv or "-v" in argv:
        print(BANNER)
        return 0
    port = int(argv[argv.index("--port") + 1]) if "--port" in argv else 6379
    _Server(("127.0.0.1", port), _Handler).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
