"""The worker's start-up check: every Redis it writes to must run ``maxmemory-policy noeviction``.

Under any other policy a Redis that reaches ``maxmemory`` deletes keys to make room: the
``volatile-*`` policies take de-dup markers and results (an event is trained twice, a handle
waits forever), the ``allkeys-*`` ones the checkpoint and the models set (the next event answers
``skipped`` and the model is gone without a word). Under ``noeviction`` a full Redis refuses
writes with ``OOM`` instead, which the worker retries.

The policy is read from ``INFO memory``, not ``CONFIG GET``: managed Redis services and
least-privilege ACL users allow the first and refuse the second.
"""

from __future__ import annotations

import redis

from producer.errors import ConfigurationError
from producer.redis_conn import connect
from producer.server_version import describe_roles, redis_roles
from producer.settings import Settings

__all__ = ["REQUIRED_POLICY", "check_eviction_policies", "eviction_policy", "redis_roles"]

REQUIRED_POLICY = "noeviction"


def eviction_policy(client: redis.Redis) -> str:
    """The server's ``maxmemory_policy`` as ``INFO memory`` reports it."""
    info = client.info("memory")
    policy = info.get("maxmemory_policy")
    if policy is None:
        raise ConfigurationError(
            "Redis INFO memory has no maxmemory_policy field (Redis 7.0 or later required)"
        )
    return str(policy)


def check_eviction_policies(settings: Settings) -> None:
    """Raise ``ConfigurationError`` (one line: the policy found and the fix) unless the store's
    Redis, and the broker's and result backend's where they differ, all run ``noeviction``."""
    for url, roles in redis_roles(settings).items():
        where = describe_roles(url, roles)
        client = connect(url, settings.publish_timeout)
        try:
            policy = eviction_policy(client)
        except redis.RedisError as exc:
            raise ConfigurationError(f"cannot read maxmemory-policy of the {where}: {exc}") from exc
        finally:
            client.close()
        if policy != REQUIRED_POLICY:
            raise ConfigurationError(
                f"the {where} has maxmemory-policy {policy}, which may evict checkpoints, markers "
                f"and results; the worker requires {REQUIRED_POLICY}: run "
                f"`CONFIG SET maxmemory-policy {REQUIRED_POLICY}` (and `CONFIG REWRITE`) or put "
                f"`maxmemory-policy {REQUIRED_POLICY}` in redis.conf"
            )
