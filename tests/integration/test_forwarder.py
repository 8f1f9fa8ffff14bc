"""The dev tools' TCP forwarder against real redis-servers: its one-way delay shows in a PING's
round trip, a hold stops a PING (its connection left open) until the link resumes, a switch moves
only later connections unless it cuts, and the subprocess form prints its port and forwards."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from worker.devtools.embedded_redis import RedisServer
from worker.devtools.forwarder import Forwarder

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def server() -> Iterator[RedisServer]:
    with RedisServer() as s:
        yield s


def _client(port: int) -> redis.Redis:
    # No retry: a cut connection must show as an error, not be hidden by a reconnect.
    return redis.Redis(port=port, socket_timeout=10, retry=Retry(NoBackoff(), 0))


def _median_ping_ms(client: redis.Redis, n: int = 30) -> float:
    client.ping()  # the connection is made outside the timing
    times = []
    for _ in range(n):
        start = time.perf_counter()
        client.ping()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def test_the_delay_shows_in_each_round_trip(server: RedisServer) -> None:
    # Given two forwarders to the same server, one with no delay and one with 10 ms each way
    with Forwarder(server.port) as plain, Forwarder(server.port, delay_ms=10) as slow:
        fast_client, slow_client = _client(plain.port), _client(slow.port)
        # When a client PINGs through each
        fast, delayed = _median_ping_ms(fast_client), _median_ping_ms(slow_client)
        fast_client.close()
        slow_client.close()
    # Then the delayed round trip is at least both delays, and many times the undelayed one
    assert delayed >= 20.0, f"a PING took {delayed:.2f} ms through 10 ms each way"
    assert delayed / fast >= 4, f"delayed {delayed:.2f} ms vs {fast:.2f} ms undelayed"


def test_the_delay_line_neither_serializes_connections_nor_limits_bandwidth(server: RedisServer) -> None:
    # Given a forwarder with 25 ms each way (a 50 ms round trip)
    with Forwarder(server.port, delay_ms=25) as fwd:
        clients = [_client(fwd.port) for _ in range(16)]
        for c in clients:
            c.ping()
        # When 16 connections each PING at once, and one pipelines 200 commands with 2 MB of data
        barrier = threading.Barrier(len(clients) + 1)
        took: list[float] = []

        def ping(c: redis.Redis) -> None:
            barrier.wait()
            start = time.perf_counter()
            c.ping()
            took.append(time.perf_counter() - start)

        threads = [threading.Thread(target=ping, args=(c,)) for c in clients]
        for t in threads:
            t.start()
        barrier.wait()
        for t in threads:
            t.join(30)
        pipe = clients[0].pipeline(transaction=False)
        value = os.urandom(10_000)
        for i in range(200):
            pipe.set(f"fwd-bw-{i}", value)
        start = time.perf_counter()
        pipe.execute()
        pipelined = time.perf_counter() - start
        got = clients[1].get("fwd-bw-199")
        for c in clients:
            c.close()
    # Then every PING took about one round trip, not a queue of 16 (serialized: 16 x 50 ms = 0.8 s),
    # and the pipeline about one round trip too, not 200, with its data intact
    assert len(took) == 16
    assert max(took) < 0.4, f"slowest of 16 concurrent PINGs: {max(took) * 1000:.0f} ms"
    assert pipelined < 2.0, f"200 pipelined SETs took {pipelined * 1000:.0f} ms through a 50 ms round trip"
    assert got == value


def test_hold_stops_a_ping_until_resume_without_closing_the_connection(server: RedisServer) -> None:
    # Given a client connected through the forwarder
    with Forwarder(server.port) as fwd:
        client = _client(fwd.port)
        before = client.client_id()
        # When the link is held and the client PINGs
        fwd.hold()
        answer: list[object] = []
        thread = threading.Thread(target=lambda: answer.append(client.ping()))
        thread.start()
        thread.join(1.0)
        # Then no answer comes while it is held
        assert thread.is_alive()
        assert not answer
        assert fwd.connections == 1
        # When the link resumes
        fwd.resume()
        thread.join(10)
        # Then the PING is answered on the same connection
        assert answer == [True]
        assert client.client_id() == before
        client.close()


def test_a_connection_made_while_held_waits_for_resume(server: RedisServer) -> None:
    # Given a held link
    with Forwarder(server.port, delay_ms=1) as fwd:
        fwd.hold()
        answer: list[object] = []
        client = _client(fwd.port)
        # When a new client connects and PINGs
        thread = threading.Thread(target=lambda: answer.append(client.ping()))
        thread.start()
        thread.join(0.5)
        # Then it waits, and is answered once the link resumes
        assert thread.is_alive()
        assert not answer
        fwd.resume()
        thread.join(10)
        assert answer == [True]
        client.close()


def test_switch_moves_later_connections_and_cut_ends_earlier_ones(server: RedisServer) -> None:
    with RedisServer() as other, Forwarder(server.port, delay_ms=1) as fwd:
        # Given a connection made through the forwarder to the first server
        old = _client(fwd.port)
        assert old.config_get("port")["port"] == str(server.port)
        # When the forwarder switches to the other server without cutting
        fwd.switch(other.port)
        new = _client(fwd.port)
        # Then the old connection stays with the first server and a new one reaches the other
        assert old.config_get("port")["port"] == str(server.port)
        assert new.config_get("port")["port"] == str(other.port)
        assert fwd.target_port == other.port
        old_id, new_id = old.client_id(), new.client_id()
        # When it switches back, cutting the connections made before
        fwd.switch(server.port, cut=True)
        # Then both earlier connections ended: each client finds its socket closed, connects
        # again (redis-py reconnects a connection it finds closed) and so reaches the first server
        assert old.config_get("port")["port"] == str(server.port)
        assert new.config_get("port")["port"] == str(server.port)
        assert old.client_id() != old_id
        assert new.client_id() != new_id
        for client in (old, new):
            client.close()


def test_a_cut_shows_as_the_end_of_the_stream(server: RedisServer) -> None:
    # Given a raw socket through the forwarder, a PING answered
    with Forwarder(server.port) as fwd, socket.create_connection(("127.0.0.1", fwd.port), timeout=10) as s:
        s.sendall(b"PING\r\n")
        assert s.recv(100) == b"+PONG\r\n"
        # When the forwarder is switched with a cut
        fwd.switch(server.port, cut=True)
        # Then the socket reads the end of its stream (or a reset)
        with contextlib.suppress(ConnectionResetError):
            assert s.recv(100) == b""
        assert fwd.connections == 0


def test_a_closed_client_closes_its_server_connection(server: RedisServer) -> None:
    # Given a forwarder and the server's count of clients
    direct = _client(server.port)
    with Forwarder(server.port) as fwd:
        before = len(direct.client_list())
        client = _client(fwd.port)
        client.ping()
        assert len(direct.client_list()) == before + 1
        # When the client closes its connection
        client.close()
        # Then the forwarder closes the one it made for it
        deadline = time.monotonic() + 10
        while len(direct.client_list()) > before and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(direct.client_list()) == before
        assert fwd.connections == 0
    direct.close()


def _start_process(*args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "worker.devtools.forwarder", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_the_forwarder_runs_as_a_process_printing_its_port(server: RedisServer) -> None:
    # Given the forwarder started as a process with 5 ms each way
    proc = _start_process("--target-port", str(server.port), "--delay-ms", "5")
    try:
        assert proc.stdout is not None
        port = int(proc.stdout.readline())
        client = _client(port)
        # Then a PING through it takes at least both delays
        assert _median_ping_ms(client, 10) >= 10.0
        # When it is sent SIGUSR1 (hold), a PING waits; SIGUSR2 (resume) lets it through
        os.kill(proc.pid, signal.SIGUSR1)
        time.sleep(0.2)
        answer: list[object] = []
        thread = threading.Thread(target=lambda: answer.append(client.ping()))
        thread.start()
        thread.join(0.5)
        assert thread.is_alive()
        os.kill(proc.pid, signal.SIGUSR2)
        thread.join(10)
        assert answer == [True]
        client.close()
        # When it is sent SIGTERM, it exits cleanly
        proc.terminate()
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (["--target-port", "6380", "--delay-ms", "-1"], "--delay-ms"),
        (["--target-port", "0"], "--target-port"),
        (["--delay-ms", "1"], "--target-port"),
    ],
)
def test_the_process_refuses_bad_arguments_naming_them(args: list[str], named: str) -> None:
    proc = _start_process(*args)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 2
    assert named in err


def test_a_negative_delay_is_refused_in_process(server: RedisServer) -> None:
    with pytest.raises(ValueError, match="delay_ms"):
        Forwarder(server.port, delay_ms=-1)
