"""Redis connections from URLs (passwords, ACL users, ``rediss://`` TLS and the sentinels of a
``sentinel://`` URL come with the URL): every component gets its clients here."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

import redis

from producer.demotion import (
    AsyncDemotionAwareConnection,
    AsyncDemotionAwareSSLConnection,
    DemotionAwareConnection,
    DemotionAwareSSLConnection,
)
from producer.sentinel import is_sentinel_url, master_client
from producer.tls import CERT_REQS, check_tls_url, ssl_options

__all__ = ["CERT_REQS", "check_tls_url", "connect", "connection_class", "redact_url", "ssl_options"]

#: Query arguments whose value is a secret.
_SECRETS = ("password", "sentinel_password")


def connection_class(url: str, *, asynchronous: bool = False) -> dict[str, Any]:
    """``connection_class=`` for a ``redis://`` or ``rediss://`` URL: connections that reconnect
    when their server turns out to be a demoted master (``producer.demotion``); nothing for
    other URLs (a Unix socket has no failover)."""
    classes: dict[str, tuple[type, type]] = {
        "redis": (DemotionAwareConnection, AsyncDemotionAwareConnection),
        "rediss": (DemotionAwareSSLConnection, AsyncDemotionAwareSSLConnection),
    }
    pair = classes.get(urlsplit(url).scheme)
    return {} if pair is None else {"connection_class": pair[asynchronous]}


def connect(url: str, timeout: float) -> redis.Redis:
    """A client whose every call fails within ``timeout`` seconds when Redis is unreachable.

    For a ``sentinel://`` URL (naming its master: ``producer.sentinel.complete_url``, which the
    settings apply), a client of the current master that follows a failover."""
    if is_sentinel_url(url):
        return master_client(url, timeout)
    return redis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        health_check_interval=30,
        **connection_class(url),
    )


def redact_url(url: str) -> str:
    """The URL with its passwords (in the user info, a ``password=`` or ``sentinel_password=``
    argument) as ``***``; in each ``;``-separated part of a sentinel URL."""
    if ";" in url:
        return ";".join(redact_url(part) for part in url.split(";"))
    parts = urlsplit(url)
    netloc = parts.netloc
    if parts.password is not None:
        userinfo, _, hostport = netloc.rpartition("@")
        netloc = f"{userinfo.partition(':')[0]}:***@{hostport}"
    query = "&".join(
        f"{p.partition('=')[0]}=***" if p.partition("=")[0].lower() in _SECRETS else p
        for p in parts.query.split("&")
    )
    return urlunsplit(parts._replace(netloc=netloc, query=query if parts.query else ""))
