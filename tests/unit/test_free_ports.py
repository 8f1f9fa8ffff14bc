"""Ports for servers started together (``worker.devtools.embedded_redis.free_ports``)."""

from __future__ import annotations

import socket

from worker.devtools.embedded_redis import free_ports


def test_ports_picked_together_are_distinct_and_free() -> None:
    # (picked one by one, a sentinel group once got the same port twice: its third sentinel
    # exited at start with "Address already in use")
    ports = free_ports(40)
    assert len(set(ports)) == 40
    for port in ports:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", port))
