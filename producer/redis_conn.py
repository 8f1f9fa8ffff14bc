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
    """The URL with its password (in the user info or a ``password=`` argument) as ``***``."""
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, hostport = netloc.rpartition("@")
        netloc = f"{userinfo.partition(':')[0]}:***@{hostport}"
    query = "&".join(
        f"{p.partition('=')[0]}=***" if p.partition("=")[0].lower() == "password" else p
        for p in parts.query.split("&")
    )
    return urlunsplit(parts._replace(netloc=netloc, query=query if parts.query else ""))
