"""A TCP forwarder: one stable address in front of a Redis that can be replaced, as a managed
service's DNS name is after a failover. New connections go to the current target; connections
made before a ``switch`` stay with the server they reached (as they do behind a DNS name), unless
the switch cuts them (as a proxy or load balancer that resets its connections on failover does)."""

from __future__ import annotations

import contextlib
import socket
import threading

__all__ = ["Forwarder"]


class Forwarder:
    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._listener.getsockname()[1])
        self._sockets: list[socket.socket] = []
        self._lock = threading.Lock()
        self._closed = False
        threading.Thread(target=self._accept, name="forwarder-accept", daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def switch(self, target_port: int, *, cut: bool = False) -> None:
        """Send connections made from now on to ``target_port``; with ``cut``, also end every
        connection made before (both sides see the stream end)."""
        self.target_port = target_port
        if cut:
            with self._lock:
                old, self._sockets = self._sockets, []
            for s in old:
                # shutdown, not only close: close does not wake the pump thread blocked in recv
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            try:
                server = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                self._sockets += [client, server]
            for a, b in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self._closed = True
        self._listener.close()
        with self._lock:
            for s in self._sockets:
                with contextlib.suppress(OSError):
                    s.close()
