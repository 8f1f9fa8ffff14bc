"""Which server is the master now, for people (the ``itrain stats`` table; never in ``--json``,
whose keys are the contract's).

Behind a sentinel URL the sentinels name it (``SENTINEL get-master-addr-by-name``); behind a
plain URL the server the store client reaches says it itself (``INFO replication``): a master
names itself, a replica names its master, so a stale address (a managed service's endpoint
still on a demoted server) shows.
"""

from __future__ import annotations

import redis

from producer.sentinel import is_sentinel_url, parse_sentinel_url
from worker.ops.failover import current_master

__all__ = ["describe_master"]


def describe_master(url: str, client: redis.Redis, timeout: float) -> str:
    """One line: the master's ``host:port`` and how it is known."""
    if is_sentinel_url(url):
        host, port = current_master(url, timeout)
        return f"{host}:{port} (named by the sentinels of {parse_sentinel_url(url).master_name})"
    kwargs = client.connection_pool.connection_kwargs
    here = f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}"
    if "path" in kwargs:
        here = str(kwargs["path"])
    info = client.info("replication")
    if info.get("role") == "master":
        return f"{here} (this server)"
    master = f"{info.get('master_host')}:{info.get('master_port')}"
    return f"{master} (this server, {here}, is its {info.get('role')})"
