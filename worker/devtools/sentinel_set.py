"""A replicated Redis under Sentinel on 127.0.0.1: one master, replicas and sentinels, for the tests
(and ``itrain up --replicas``). Every process is this process's own, started on free ports from
the installed binary (``redis-server conf --sentinel`` runs Sentinel) and stopped by its pid.

The sentinels fail a master over after ``down_after_ms`` without answers (1 s here: quick tests)
and need ``quorum`` of them to agree; each writes its view back to its own configuration file,
which must therefore be writable (a directory of the set's own).
"""

from __future__ import annotations

import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import redis

from producer.errors import ConfigurationError
from worker.devtools.embedded_redis import RedisServer, find_redis_server, free_ports

__all__ = ["SentinelSet", "sentinel_fields"]


def _wait(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except (redis.RedisError, OSError):
            pass
        time.sleep(0.05)
    raise ConfigurationError(f"timed out after {timeout:g} s waiting for {what}")


class SentinelSet:
    """``replicas`` replicas of one master and ``sentinels`` sentinels monitoring it as ``name``.

    ``password``: every data server's (``requirepass``, and ``masterauth`` so replicas follow);
    ``sentinel_password``: the sentinels' own (``requirepass`` in their configuration).
    ``tls_dir``: ``ca.crt``, ``server.crt`` and ``server.key`` for 127.0.0.1: every server and
    sentinel then speaks TLS only (replication and the sentinels' own links included).
    """

    def __init__(
        self,
        *,
        name: str = "itrain",
        replicas: int = 2,
        sentinels: int = 3,
        quorum: int = 2,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 3000,
        password: str | None = None,
        sentinel_password: str | None = None,
        data_dir: str | Path | None = None,
        binary: str | None = None,
        tls_dir: str | Path | None = None,
    ) -> None:
        self.name = name
        self.tls_dir = Path(tls_dir).resolve() if tls_dir else None
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.password = password
        self.sentinel_password = sentinel_password
        self._tmp = None if data_dir else tempfile.TemporaryDirectory(prefix="itrain-sentinel-")
        self.dir = Path(data_dir or self._tmp.name).resolve()  # type: ignore[union-attr]
        self.binary = binary
        auth = ["--masterauth", password] if password else []
        # Every port of the group at once, so that no two of them are the same (``free_ports``).
        ports = free_ports(replicas + 1 + sentinels)
        self.servers = [
            RedisServer(
                port=ports[i],
                password=password,
                extra=auth,
                data_dir=self.dir / f"redis{i}",
                tls_dir=self.tls_dir,
            )
            for i in range(replicas + 1)
        ]
        self.sentinel_ports = ports[replicas + 1 :]
        self.sentinel_procs: list[subprocess.Popen[bytes] | None] = [None] * sentinels

    # -- addresses --------------------------------------------------------------------------------

    def url(self, db: int = 0, *, master_name: bool = False) -> str:
        """``sentinel://127.0.0.1:p1;sentinel://127.0.0.1:p2;.../db`` (with the data servers'
        password, and ``?master_name=`` when asked)."""
        auth = f":{self.password}@" if self.password else ""
        options = [f"master_name={self.name}"] if master_name else []
        if self.tls_dir is not None:
            options += ["ssl_cert_reqs=required", f"ssl_ca_certs={self.tls_dir / 'ca.crt'}"]
        query = f"?{'&'.join(options)}" if options else ""
        return ";".join(f"sentinel://{auth}127.0.0.1:{port}/{db}{query}" for port in self.sentinel_ports)

    def _tls(self) -> dict[str, Any]:
        if self.tls_dir is None:
            return {}
        return {"ssl": True, "ssl_cert_reqs": "required", "ssl_ca_certs": str(self.tls_dir / "ca.crt")}

    def sentinel_client(self, i: int) -> redis.Redis:
        return redis.Redis(
            "127.0.0.1",
            self.sentinel_ports[i],
            password=self.sentinel_password,
            socket_timeout=5,
            socket_connect_timeout=5,
            decode_responses=True,
            **self._tls(),
        )

    def server_client(self, port: int) -> redis.Redis:
        return redis.Redis(
            "127.0.0.1",
            port,
            password=self.password,
            socket_timeout=5,
            socket_connect_timeout=5,
            **self._tls(),
        )

    def master_port(self, sentinel: int | None = None) -> int:
        """The master's port as a running sentinel (``sentinel``, or the first that answers) sees it."""
        order = [sentinel] if sentinel is not None else range(len(self.sentinel_ports))
        for i in order:
            if self.sentinel_procs[i] is None:
                continue
            with self.sentinel_client(i) as client:
                addr = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.name)
            if addr:
                return int(addr[1])
        raise ConfigurationError(f"no running sentinel names a master for {self.name!r}")

    def server(self, port: int) -> RedisServer:
        return next(s for s in self.servers if s.port == port)

    # -- lifecycle --------------------------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> SentinelSet:
        self.binary = self.binary or find_redis_server()
        master = self.servers[0]
        master.binary = self.binary
        master.start()
        for replica in self.servers[1:]:
            replica.binary = self.binary
            replica.extra = [*replica.extra, "--replicaof", "127.0.0.1", str(master.port)]
            replica.start()
        for i in range(len(self.sentinel_ports)):
            self.start_sentinel(i, master.port)
        self.wait_ready(timeout)
        return self

    def start_sentinel(self, i: int, master_port: int | None = None) -> None:
        """Start sentinel ``i`` (again, after ``stop_sentinel``: from its own configuration file)."""
        folder = self.dir / f"sentinel{i}"
        folder.mkdir(parents=True, exist_ok=True)
        conf = folder / "sentinel.conf"
        if not conf.exists():
            port = [f"port {self.sentinel_ports[i]}"]
            if self.tls_dir is not None:
                d = self.tls_dir
                port = [
                    "port 0",
                    f"tls-port {self.sentinel_ports[i]}",
                    f"tls-cert-file {d / 'server.crt'}",
                    f"tls-key-file {d / 'server.key'}",
                    f"tls-ca-cert-file {d / 'ca.crt'}",
                    "tls-auth-clients no",
                    "tls-replication yes",
                ]
            lines = [
                *port,
                "bind 127.0.0.1",
                f"dir {folder}",
                f"logfile {folder / 'sentinel.log'}",
                f"sentinel monitor {self.name} 127.0.0.1 {master_port or self.servers[0].port} {self.quorum}",
                f"sentinel down-after-milliseconds {self.name} {self.down_after_ms}",
                f"sentinel failover-timeout {self.name} {self.failover_timeout_ms}",
                f"sentinel parallel-syncs {self.name} 1",
            ]
            if self.password:
                lines.append(f"sentinel auth-pass {self.name} {self.password}")
            if self.sentinel_password:
                # Sentinels log in to each other with these too.
                lines += [
                    f"requirepass {self.sentinel_password}",
                    f"sentinel sentinel-pass {self.sentinel_password}",
                ]
            conf.write_text("\n".join(lines) + "\n")
        assert self.binary is not None
        self.sentinel_procs[i] = subprocess.Popen(
            [self.binary, str(conf), "--sentinel"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def stop_sentinel(self, i: int) -> None:
        proc = self.sentinel_procs[i]
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        self.sentinel_procs[i] = None

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until every running sentinel sees the master, every live replica and the others, and the
        master has every live replica attached and in step."""
        live = [s for s in self.servers if s.proc is not None and s.proc.poll() is None]
        running = [i for i, p in enumerate(self.sentinel_procs) if p is not None]

        def ready() -> bool:
            port = self.master_port()
            with self.server_client(port) as master:
                info = master.info("replication")
                if info.get("role") != "master" or int(info.get("connected_slaves", 0)) < len(live) - 1:
                    return False
                offset = int(info["master_repl_offset"])
                for k in range(int(info["connected_slaves"])):
                    slave = info[f"slave{k}"]
                    if slave.get("state") != "online" or int(slave.get("offset", -1)) < offset:
                        return False
            for i in running:
                with self.sentinel_client(i) as client:
                    fields = sentinel_fields(client.execute_command("SENTINEL", "MASTER", self.name))
                    if int(fields["port"]) != port or "s_down" in str(fields.get("flags", "")):
                        return False
                    if int(fields["num-slaves"]) < len(live) - 1:
                        return False
                    if int(fields["num-other-sentinels"]) < len(running) - 1:
                        return False
                    replicas = client.execute_command("SENTINEL", "REPLICAS", self.name)
                    up = [r for r in replicas if "s_down" not in str(sentinel_fields(r).get("flags", ""))]
                    if len(up) < len(live) - 1:
                        return False
            return True

        _wait(ready, timeout, f"the sentinels of {self.name!r} to agree on a master with its replicas")

    def failover(self, timeout: float = 60.0) -> int:
        """``SENTINEL FAILOVER``, then wait until every running sentinel names the new master and
        it answers as one; returns the new master's port."""
        old = self.master_port()
        running = [i for i, p in enumerate(self.sentinel_procs) if p is not None]

        def ask() -> bool:
            with self.sentinel_client(running[0]) as client:
                client.execute_command("SENTINEL", "FAILOVER", self.name)
            return True

        _wait(ask, timeout, "a sentinel to accept SENTINEL FAILOVER")
        self.wait_new_master(old, timeout)
        return self.master_port()

    def wait_new_master(self, old: int, timeout: float = 60.0) -> int:
        """Until every running sentinel names a master other than ``old``, it is one, and ``old``
        (when it still answers) is a replica."""
        running = [i for i, p in enumerate(self.sentinel_procs) if p is not None]

        old_server = next((s for s in self.servers if s.port == old), None)

        def moved() -> bool:
            ports = {self.master_port(i) for i in running}
            if len(ports) != 1 or old in ports:
                return False
            with self.server_client(ports.pop()) as client:
                if client.info("replication").get("role") != "master":
                    return False
            if old_server is None or old_server.proc is None or old_server.proc.poll() is not None:
                return True
            # A live old master keeps taking writes until the sentinels turn it into a replica.
            try:
                with self.server_client(old) as client:
                    return bool(client.info("replication").get("role") == "slave")
            except (redis.ConnectionError, redis.TimeoutError):
                return True  # stopped (SIGSTOP, killed): nothing reaches it either

        _wait(moved, timeout, f"the sentinels to promote a replica of {self.name!r}")
        return self.master_port()

    def close(self) -> None:
        for i in range(len(self.sentinel_procs)):
            self.stop_sentinel(i)
        for server in self.servers:
            server.close()
        if self._tmp is not None:
            self._tmp.cleanup()

    def __enter__(self) -> SentinelSet:
        try:
            return self.start()
        except BaseException:
            self.close()  # (what did start is stopped: a test's failed setup leaves no server behind)
            raise

    def __exit__(self, *exc: object) -> None:
        self.close()


def sentinel_fields(reply: object) -> dict[str, Any]:
    """A sentinel's reply about one instance as a dict (RESP2 gives a flat list)."""
    if isinstance(reply, dict):
        return reply
    if isinstance(reply, list):
        return dict(zip(reply[::2], reply[1::2], strict=False))
    return {}
