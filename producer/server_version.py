"""The minimum server version, checked when a process that needs it connects.

The worker needs Redis 7.0: its fetch script declares ``#!lua flags=`` and it moves messages with
``BLMOVE``. On an older server every fetch fails with a ``ResponseError``, which Celery's
consumer takes for a lost connection and retries for ever. The worker, the ``itrain`` commands
and the embedded launcher therefore read the version once at start and refuse an older server
with one line instead.

The version is read with ``HELLO`` (no arguments: it reports the connection's properties and
leaves its protocol as it is), which every ACL role of ``itrain acl`` may run; ``INFO`` is refused
to the producer role. Valkey answers ``server: valkey`` with its own version; it forked from Redis
7.2.4, so Valkey 7.2 or later has everything Redis 7.0 has.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import redis

from producer.errors import ConfigurationError, PermissionDeniedError, ServerVersionError
from producer.redis_conn import connect, redact_url
from producer.settings import Settings

__all__ = [
    "MINIMUM",
    "MINIMUM_TEXT",
    "ServerVersion",
    "check_server_version",
    "check_server_versions",
    "describe_roles",
    "meets_minimum",
    "parse_version",
    "read_server_version",
    "redis_roles",
]

#: The oldest version of each server the project runs on.
MINIMUM: dict[str, tuple[int, int, int]] = {"redis": (7, 0, 0), "valkey": (7, 2, 0)}
MINIMUM_TEXT = "Redis 7.0 or later (or Valkey 7.2 or later)"


def parse_version(text: str) -> tuple[int, int, int] | None:
    """``(major, minor, patch)`` of ``"7.0.15"`` (a missing part is 0); None when unreadable."""
    match = re.match(r"(\d+)(?:\.(\d+))?(?:\.(\d+))?", text.strip())
    if match is None:
        return None
    major, minor, patch = match.groups()
    return int(major), int(minor or 0), int(patch or 0)


def meets_minimum(server: str, version: str) -> bool:
    """Whether ``server`` (``redis`` or ``valkey``, as HELLO or ``--version`` names it) at
    ``version`` is new enough. An unknown server name is held to Redis's minimum."""
    parsed = parse_version(version)
    return parsed is not None and parsed >= MINIMUM.get(server.lower(), MINIMUM["redis"])


@dataclass(frozen=True)
class ServerVersion:
    server: str  # "redis" or "valkey"
    version: str

    @property
    def ok(self) -> bool:
        return meets_minimum(self.server, self.version)

    def __str__(self) -> str:
        name = {"redis": "Redis", "valkey": "Valkey"}.get(self.server.lower(), self.server)
        return f"{name} {self.version}"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def read_server_version(client: redis.Redis) -> ServerVersion:
    """The server's name and version from ``HELLO``. A server that refuses ``HELLO`` without
    arguments is older than Redis 6.2: ``ServerVersionError``. ``NOPERM``:
    ``PermissionDeniedError``."""
    try:
        reply = client.execute_command("HELLO")  # type: ignore[no-untyped-call]
    except redis.exceptions.NoPermissionError as exc:
        raise PermissionDeniedError(f"the user may not run HELLO ({exc}): add +hello to its ACL") from exc
    except redis.ResponseError as exc:
        # Redis 6.0 requires a protocol version (and answering it would switch this connection's
        # protocol); Redis 5 has no HELLO at all.
        raise ServerVersionError(f"it is older than Redis 6.2 (it refused HELLO: {exc})") from exc
    if isinstance(reply, list):  # RESP2: a flat list of field, value
        reply = dict(zip(reply[::2], reply[1::2], strict=True))
    fields = {_text(k): v for k, v in dict(reply).items()}
    return ServerVersion(_text(fields.get("server", "redis")), _text(fields.get("version", "?")))


def check_server_version(client: redis.Redis, where: str) -> ServerVersion:
    """The server's version, or ``ServerVersionError`` naming ``where`` (the server's address),
    the version found and the minimum when it is older."""
    try:
        found = read_server_version(client)
    except ServerVersionError as exc:
        raise ServerVersionError(f"the {where}: {exc}; interaction-trainer needs {MINIMUM_TEXT}") from None
    except PermissionDeniedError as exc:
        raise PermissionDeniedError(f"cannot read the version of the {where}: {exc}") from None
    if not found.ok:
        raise ServerVersionError(f"the {where} runs {found}; interaction-trainer needs {MINIMUM_TEXT}")
    return found


def redis_roles(settings: Settings) -> dict[str, list[str]]:
    """Each distinct Redis URL a worker uses, with the roles it plays (store first)."""
    roles: dict[str, list[str]] = {}
    for role, url in (
        ("store", settings.store),
        ("broker", settings.broker),
        ("result backend", settings.backend),
    ):
        roles.setdefault(url, []).append(role)
    return roles


def describe_roles(url: str, roles: list[str]) -> str:
    """``"store, broker and result backend Redis redis://host:port/0"`` (password redacted)."""
    named = roles[0] if len(roles) == 1 else f"{', '.join(roles[:-1])} and {roles[-1]}"
    return f"{named} Redis {redact_url(url)}"


def check_server_versions(settings: Settings) -> None:
    """``check_server_version`` of every Redis the settings name (store, broker, result
    backend), each distinct server once. An unreachable one raises redis-py's error."""
    for url, roles in redis_roles(settings).items():
        client = connect(url, settings.publish_timeout)
        try:
            check_server_version(client, describe_roles(url, roles))
        except (redis.ConnectionError, redis.TimeoutError):
            raise  # the caller's "cannot reach" line
        except redis.RedisError as exc:
            raise ConfigurationError(
                f"cannot read the version of the {describe_roles(url, roles)}: {exc}"
            ) from exc
        finally:
            client.close()
