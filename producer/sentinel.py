"""Sentinel URLs: reading ``sentinel://h1:p1;sentinel://h2:p2/db`` and making a client of its master.

A Redis under Sentinel has no fixed address: the sentinels name its current master, and after a
failover another server is the master. Every Redis URL setting may therefore be kombu's form of a
sentinel URL, every sentinel of the group a ``;``-separated part::

    sentinel://[user:password@]host:port;sentinel://host:port;...[/db][?options]

The user, password and database are the master's (they may be written on any part; parts that
disagree are refused). Options, on any part: ``master_name`` (which group the sentinels
monitor; otherwise ``ITRAIN_SENTINEL_MASTER``), ``sentinel_username`` and ``sentinel_password``
(how to log in to the sentinels; otherwise ``ITRAIN_SENTINEL_USERNAME`` and
``ITRAIN_SENTINEL_PASSWORD``), and the ``ssl_*`` options of ``rediss://``, which turn TLS on for
the master and the sentinels alike, under the same certificate rule (``ssl_cert_reqs`` given).

Every part is used: a client asks each sentinel in turn until one names the master, and after a
failover redis-py's sentinel-managed connections ask again (a ``READONLY`` reply from a demoted
master becomes a ``ConnectionError`` there, so the next command reconnects to the new master).
Each sentinel gets a share of the caller's timeout, so that hung sentinels together cannot hold
a caller longer than the timeout (``ITRAIN_PUBLISH_TIMEOUT``).

A master that the sentinels replaced keeps taking writes until they turn it into a replica, which
took ten seconds after a planned ``SENTINEL FAILOVER`` here, and what it took meanwhile is wiped
when it resyncs. So a client also asks the sentinels at most every ``MASTER_CHECK_INTERVAL``
seconds, when it takes a connection, where the master is; a connection to another server is
dropped and the next command reconnects to the sentinels' master. Measured under 50 pushes a
second: without the check 534 of 1,255 pushes were lost (sent during the 11 s before the
demotion); with it 236 of 1,251 (the 5 s until every sentinel reported the new master in
``SENTINEL MASTERS``). What remains is for ``WAIT`` on the producer's side to close.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, replace
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

import redis
import redis.asyncio as aioredis
import redis.asyncio.sentinel as aiosentinel
import redis.sentinel

from producer.demotion import (
    AsyncWriteAwareSentinelConnection,
    AsyncWriteAwareSentinelSSLConnection,
    WriteAwareSentinelConnection,
    WriteAwareSentinelSSLConnection,
)
from producer.errors import ConfigurationError
from producer.sentinel_discovery import AsyncFailoverAwareSentinel, FailoverAwareSentinel
from producer.tls import SSL_ARGS, cert_reqs

__all__ = [
    "DEFAULT_PORT",
    "SCHEME",
    "SentinelURL",
    "async_master_client",
    "complete_url",
    "is_sentinel_url",
    "master_client",
    "parse_sentinel_url",
]

SCHEME = "sentinel"
DEFAULT_PORT = 26379
#: Options of our own on a sentinel URL (removed before a URL is handed to kombu or Celery).
OWN_OPTIONS = ("master_name", "sentinel_username", "sentinel_password")
#: The least time a sentinel is given to answer, however many there are.
MIN_SENTINEL_TIMEOUT = 0.25
#: Seconds between two questions of a client to the sentinels: is my master still the master?
MASTER_CHECK_INTERVAL = 1.0


def is_sentinel_url(url: str) -> bool:
    return url.startswith(SCHEME + "://")


@dataclass(frozen=True)
class SentinelURL:
    """A parsed sentinel URL (``parse_sentinel_url``)."""

    sentinels: tuple[tuple[str, int], ...]
    db: int = 0
    username: str | None = None
    password: str | None = None
    master_name: str | None = None
    sentinel_username: str | None = None
    sentinel_password: str | None = None
    #: The ``ssl_*`` options (certificate requirement in redis-py's spelling); empty: no TLS.
    ssl: tuple[tuple[str, str], ...] = ()

    def with_defaults(
        self, master_name: str | None, sentinel_username: str | None, sentinel_password: str | None
    ) -> SentinelURL:
        """This URL, with the settings' values where the URL names none."""
        return replace(
            self,
            master_name=self.master_name or master_name,
            sentinel_username=self.sentinel_username or sentinel_username,
            sentinel_password=self.sentinel_password or sentinel_password,
        )

    def url(self, scheme: str = SCHEME, *, own_options: bool = True) -> str:
        """The URL again, in a canonical form: every part carries the credentials, database and
        TLS options (kombu reads them from whichever part it is connected through).
        ``own_options=False``: without ``master_name`` and the sentinel credentials, for
        kombu and Celery, which refuse options they do not know."""
        auth = ""
        if self.username or self.password:
            auth = f"{quote(self.username or '', safe='')}:{quote(self.password or '', safe='')}@"
        options: list[tuple[str, str]] = list(self.ssl)
        if own_options:
            options += [
                (key, value)
                for key, value in (
                    ("master_name", self.master_name),
                    ("sentinel_username", self.sentinel_username),
                    ("sentinel_password", self.sentinel_password),
                )
                if value
            ]
        query = f"?{urlencode(options, safe='/:')}" if options else ""
        return ";".join(f"{scheme}://{auth}{host}:{port}/{self.db}{query}" for host, port in self.sentinels)

    def ssl_kwargs(self) -> dict[str, Any]:
        """redis-py's TLS arguments (``ssl=True`` and the options), or nothing without TLS."""
        if not self.ssl:
            return {}
        kwargs: dict[str, Any] = {"ssl": True}
        for key, value in self.ssl:
            kwargs[key] = value.lower() in ("1", "true", "yes") if key == "ssl_check_hostname" else value
        return kwargs

    def sentinel_kwargs(self, timeout: float) -> dict[str, Any]:
        """The connection arguments of each sentinel: its share of ``timeout``, its login, TLS."""
        share = max(MIN_SENTINEL_TIMEOUT, timeout / max(1, len(self.sentinels)))
        kwargs: dict[str, Any] = {
            "socket_timeout": min(timeout, share),
            "socket_connect_timeout": min(timeout, share),
            **self.ssl_kwargs(),
        }
        if self.sentinel_username:
            kwargs["username"] = self.sentinel_username
        if self.sentinel_password:
            kwargs["password"] = self.sentinel_password
        return kwargs

    def master_kwargs(self, timeout: float) -> dict[str, Any]:
        """The connection arguments of the master's connections."""
        kwargs: dict[str, Any] = {
            "db": self.db,
            "socket_timeout": timeout,
            "socket_connect_timeout": timeout,
            "health_check_interval": 30,
            **self.ssl_kwargs(),
        }
        if self.username:
            kwargs["username"] = self.username
        if self.password:
            kwargs["password"] = self.password
        return kwargs

    def required_master(self) -> str:
        if not self.master_name:
            raise ConfigurationError(_NO_MASTER.format(name="the sentinel URL"))
        return self.master_name


_NO_MASTER = (
    "{name} is a sentinel URL without a master name: set ITRAIN_SENTINEL_MASTER to the name the "
    "sentinels monitor (`sentinel monitor <name> ...`), or add ?master_name=<name> to the URL"
)


def parse_sentinel_url(url: str, name: str = "the Redis URL") -> SentinelURL:
    """``url`` read (see the module's docstring); ``ConfigurationError`` naming ``name`` (the
    setting) for a part that is not a sentinel address, parts that disagree, an unknown option
    or TLS without ``ssl_cert_reqs``."""
    sentinels: list[tuple[str, int]] = []
    found: dict[str, str] = {}
    ssl: dict[str, str] = {}
    for chunk in url.split(";"):
        if not chunk.strip():
            continue
        parts = urlsplit(chunk.strip())
        if parts.scheme != SCHEME or not parts.hostname:
            raise ConfigurationError(
                f"{name}: {chunk.split('@')[-1]!r} is not a sentinel address (sentinel://host:port)"
            )
        try:
            port = parts.port or DEFAULT_PORT
        except ValueError:
            raise ConfigurationError(f"{name}: a sentinel address has a bad port") from None
        sentinels.append((parts.hostname, port))
        given: dict[str, str | None] = {
            "username": unquote(parts.username) if parts.username else None,
            "password": unquote(parts.password) if parts.password is not None else None,
            "db": parts.path.strip("/") or None,
        }
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            if key in SSL_ARGS:
                ssl[key] = value
            elif key in OWN_OPTIONS:
                given[key] = value
            else:
                raise ConfigurationError(
                    f"{name}: unknown option {key!r} on a sentinel URL (known: "
                    f"{', '.join((*OWN_OPTIONS, *SSL_ARGS))})"
                )
        for key, maybe in given.items():
            if maybe is None:
                continue
            if found.setdefault(key, maybe) != maybe:
                shown = "the password" if "password" in key else f"{key} ({found[key]} and {maybe})"
                raise ConfigurationError(f"{name}: the parts of the sentinel URL disagree on {shown}")
    if not sentinels:
        raise ConfigurationError(f"{name}: a sentinel URL names no sentinel")
    db = found.get("db", "0")
    if not db.isdigit():
        raise ConfigurationError(f"{name}: the database of a sentinel URL must be a number, not {db!r}")
    if ssl:
        ssl["ssl_cert_reqs"] = cert_reqs(
            [ssl["ssl_cert_reqs"]] if "ssl_cert_reqs" in ssl else [], name, "sentinel"
        )
    return SentinelURL(
        sentinels=tuple(sentinels),
        db=int(db),
        username=found.get("username"),
        password=found.get("password"),
        master_name=found.get("master_name"),
        sentinel_username=found.get("sentinel_username"),
        sentinel_password=found.get("sentinel_password"),
        ssl=tuple(sorted(ssl.items())),
    )


def complete_url(
    url: str,
    name: str,
    master_name: str | None,
    sentinel_username: str | None = None,
    sentinel_password: str | None = None,
) -> str:
    """A sentinel ``url`` that names its master and the sentinels' login (the settings' values
    where the URL has none), in canonical form; any other URL as it is. ``ConfigurationError``
    when no master name is known, or the URL is unreadable."""
    if not is_sentinel_url(url):
        return url
    parsed = parse_sentinel_url(url, name).with_defaults(master_name, sentinel_username, sentinel_password)
    if not parsed.master_name:
        raise ConfigurationError(_NO_MASTER.format(name=name))
    return parsed.url()


class CheckedPool(redis.sentinel.SentinelConnectionPool):
    """redis-py's pool of master connections, asking the sentinels where the master is at most
    every ``MASTER_CHECK_INTERVAL`` seconds when a connection is taken (see the module's docstring)."""

    _checked_at = 0.0

    def __init__(self, service_name: str, sentinel_manager: Any, **kwargs: Any) -> None:
        # Connections that also drop a master refusing writes (NOREPLICAS): producer.demotion.
        ssl = kwargs.get("ssl", False)
        kwargs.setdefault(
            "connection_class", WriteAwareSentinelSSLConnection if ssl else WriteAwareSentinelConnection
        )
        super().__init__(service_name, sentinel_manager, **kwargs)  # type: ignore[no-untyped-call]

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        self.check_master()
        connection = super().get_connection(*args, **kwargs)
        # Made before the master moved: connect again (through the sentinels).
        if not self.owns_connection(connection):  # type: ignore[no-untyped-call]
            connection.disconnect()  # type: ignore[no-untyped-call]
            connection.connect()  # type: ignore[no-untyped-call]
        return connection

    def check_master(self) -> None:
        """Ask the sentinels now, if the last time is ``MASTER_CHECK_INTERVAL`` ago: redis-py then
        drops idle connections to a server that is no longer the master, and later releases of
        busy ones (``owns_connection``)."""
        now = time.monotonic()
        if now - self._checked_at < MASTER_CHECK_INTERVAL:
            return
        self._checked_at = now
        # No sentinel answers: keep the connections; a command's own error will tell.
        with contextlib.suppress(redis.RedisError):
            self.get_master_address()  # type: ignore[no-untyped-call]

    def stale(self, connection: Any) -> bool:
        """Whether ``connection`` (made from this pool's settings, maybe held outside it) is
        connected to a server the sentinels no longer name."""
        self.check_master()
        return connection._sock is not None and not self.owns_connection(connection)  # type: ignore[no-untyped-call]


class AsyncCheckedPool(aiosentinel.SentinelConnectionPool):
    """``CheckedPool`` for asyncio."""

    _checked_at = 0.0

    def __init__(self, service_name: str, sentinel_manager: Any, **kwargs: Any) -> None:
        ssl = kwargs.get("ssl", False)
        kwargs.setdefault(
            "connection_class",
            AsyncWriteAwareSentinelSSLConnection if ssl else AsyncWriteAwareSentinelConnection,
        )
        super().__init__(service_name, sentinel_manager, **kwargs)  # type: ignore[no-untyped-call]

    async def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        now = time.monotonic()
        if now - self._checked_at >= MASTER_CHECK_INTERVAL:
            self._checked_at = now
            with contextlib.suppress(redis.RedisError):
                await self.get_master_address()  # type: ignore[no-untyped-call]
        connection = await super().get_connection(*args, **kwargs)  # type: ignore[no-untyped-call]
        # (redis-py's async owns_connection() calls a method its base class lacks)
        if self.master_address != (connection.host, connection.port):
            await connection.disconnect()
            await connection.connect()
        return connection


def _sentinel(parsed: SentinelURL, timeout: float) -> redis.sentinel.Sentinel:
    # Passes over a sentinel in the middle of a failover: it still names the old master
    # (producer.sentinel_discovery).
    return FailoverAwareSentinel(
        list(parsed.sentinels),
        sentinel_kwargs=parsed.sentinel_kwargs(timeout),
        **parsed.master_kwargs(timeout),
    )


def master_client(url: str, timeout: float) -> redis.Redis:
    """A client of the master that the sentinels of ``url`` name now, and after a failover."""
    parsed = parse_sentinel_url(url)
    manager = _sentinel(parsed, timeout)
    client: redis.Redis = manager.master_for(
        parsed.required_master(), redis_class=redis.Redis, connection_pool_class=CheckedPool
    )
    return client


def async_master_client(url: str, timeout: float) -> aioredis.Redis:
    """``master_client`` for asyncio (``redis.asyncio.sentinel``)."""
    parsed = parse_sentinel_url(url)
    manager = AsyncFailoverAwareSentinel(
        list(parsed.sentinels),
        sentinel_kwargs=parsed.sentinel_kwargs(timeout),
        **parsed.master_kwargs(timeout),
    )
    client: aioredis.Redis = manager.master_for(
        parsed.required_master(), redis_class=aioredis.Redis, connection_pool_class=AsyncCheckedPool
    )
    return client
