"""Redis connections from URLs (passwords, ACL users and ``rediss://`` TLS come with the URL)."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import redis

__all__ = ["connect", "redact_url"]


def connect(url: str, timeout: float) -> redis.Redis:
    """A client whose every call fails within ``timeout`` seconds when Redis is unreachable."""
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        health_check_interval=30,
    )


def redact_url(url: str) -> str:
    """The URL with its password replaced by ``***``, for messages and logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))
