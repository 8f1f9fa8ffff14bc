"""``itrain failover``: a planned failover of a Redis under Sentinel that loses no acknowledged write.

A bare ``SENTINEL FAILOVER`` loses writes (measured for issue 16: 301-322 of ~300/s with
``WAIT 1``): the old master stays a writable master until a sentinel reconfigures it, which
under a write pause is never (the sentinel's own ``PUBLISH`` waits behind the pause and its
``SLAVEOF`` behind that), and without one, seconds later. So the steps are:

1. ``CLIENT PAUSE <ms> WRITE`` on the master: writers wait (reads go on), nothing new is acknowledged;
2. wait until every replica's offset reaches the master's ``master_repl_offset``: each holds it all;
3. ``SENTINEL FAILOVER <name>``: the sentinels promote one of them;
4. wait until the sentinels name another master, which answers as one (the pause is renewed
   meanwhile, so the old master never takes a write as a master);
5. ``REPLICAOF <new>`` on the old master ourselves (admin commands are not paused), then
   ``CLIENT UNPAUSE``: the writers that waited are answered ``READONLY`` by a replica and
   reconnect through the sentinels to the new master.

When anything fails before step 3 the old master is unpaused: it is still the master (unless the
sentinels, their ``down-after-milliseconds`` passed under the pause, failed it over themselves:
then it is first made a replica of theirs). Keep ``timeout`` below ``down-after-milliseconds``.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from producer.errors import ConfigurationError, ItrainError
from producer.sentinel import SentinelURL, is_sentinel_url, parse_sentinel_url

__all__ = ["Address", "FailoverResult", "current_master", "planned_failover"]

Address = tuple[str, int]

#: How often conditions are polled, seconds.
POLL = 0.05


@dataclass(frozen=True)
class FailoverResult:
    name: str
    old: Address
    new: Address
    offset: int


def _show(addr: Address) -> str:
    return f"{addr[0]}:{addr[1]}"


class _Group:
    """The sentinels of a URL and the data servers they name, with bounded sockets."""

    def __init__(self, parsed: SentinelURL, timeout: float) -> None:
        self.parsed = parsed
        self.name = parsed.required_master()
        self.timeout = timeout

    def sentinel(self, addr: Address) -> redis.Redis:
        kwargs = self.parsed.sentinel_kwargs(self.timeout)
        return redis.Redis(addr[0], addr[1], decode_responses=True, **kwargs)

    def server(self, addr: Address) -> redis.Redis:
        kwargs = self.parsed.master_kwargs(self.timeout)
        kwargs.pop("health_check_interval", None)
        return redis.Redis(addr[0], addr[1], decode_responses=True, **kwargs)

    def views(self) -> dict[Address, Address | None]:
        """What each sentinel that answers names as the master (``None``: it names none)."""
        seen: dict[Address, Address | None] = {}
        for addr in self.parsed.sentinels:
            try:
                with self.sentinel(addr) as client:
                    reply = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.name)
            except (redis.ConnectionError, redis.TimeoutError):
                continue
            seen[addr] = (str(reply[0]), int(reply[1])) if reply else None
        return seen

    def master(self) -> Address:
        for named in self.views().values():
            if named is not None:
                return named
        raise ConfigurationError(
            f"no sentinel of {', '.join(map(_show, self.parsed.sentinels))} names a master {self.name!r}"
        )


def _sentinel_group(url: str, timeout: float) -> _Group:
    if not is_sentinel_url(url):
        raise ConfigurationError(
            "failover needs a sentinel URL in ITRAIN_REDIS_URL "
            "(sentinel://host:port;sentinel://host:port, with ITRAIN_SENTINEL_MASTER)"
        )
    return _Group(parse_sentinel_url(url, "ITRAIN_REDIS_URL"), timeout)


def current_master(url: str, timeout: float) -> Address:
    """The master the sentinels of the sentinel ``url`` name now."""
    return _sentinel_group(url, timeout).master()


def _wait(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
            if value:
                return value
        except (redis.ConnectionError, redis.TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise ItrainError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(POLL)


def _replicas(info: dict[str, Any]) -> list[dict[str, Any]]:
    return [info[f"slave{k}"] for k in range(int(info.get("connected_slaves", 0))) if f"slave{k}" in info]


def planned_failover(
    url: str,
    *,
    pause_ms: int = 5000,
    timeout: float = 30.0,
    say: Callable[[str], None] = print,
) -> FailoverResult:
    """Fail the master of the sentinel ``url`` over to a replica that holds every write (see the
    module's docstring); ``say`` gets one line per step. ``timeout`` bounds each wait, seconds;
    ``pause_ms`` is the write pause, renewed until the old master is a replica."""
    group = _sentinel_group(url, min(timeout, 5.0))
    old = group.master()
    say(f"master {group.name} is {_show(old)}")
    master = group.server(old)
    info = master.info("replication")
    if info.get("role") != "master":
        raise ItrainError(
            f"{_show(old)} answers as a {info.get('role')}, not a master: the sentinels disagree"
        )
    online = [r for r in _replicas(info) if r.get("state") == "online"]
    if not online:
        raise ItrainError(f"master {_show(old)} has no replica online to fail over to")
    master.client_pause(pause_ms, all=False)  # WRITE
    paused_at = time.monotonic()
    say(f"paused writes on {_show(old)} for up to {pause_ms} ms")
    try:
        offset = _wait(lambda: _caught_up(master, len(online)), timeout, "the replicas to catch up")
        say(f"replicas caught up at offset {offset}: {len(online)} of {len(online)}")
        asked = _ask_failover(group)
        say(f"sentinel {_show(asked)} accepted SENTINEL FAILOVER {group.name}")
    except BaseException:
        _give_up(group, master, old, say)
        raise

    def promoted() -> Address | None:
        nonlocal paused_at
        # Renew the pause before it ends: the old master must not take a write as a master.
        if time.monotonic() - paused_at > pause_ms / 2000:
            master.client_pause(pause_ms, all=False)  # WRITE
            paused_at = time.monotonic()
        named = set(group.views().values())
        if len(named) != 1:
            return None
        new = named.pop()
        if new is None or new == old:
            return None
        with group.server(new) as client:
            return new if client.info("replication").get("role") == "master" else None

    new: Address = _wait(promoted, timeout, f"the sentinels to name a new master of {group.name}")
    say(f"the sentinels name the new master {_show(new)}")
    master.replicaof(new[0], str(new[1]))
    master.client_unpause()
    say(f"{_show(old)} is a replica of {_show(new)}; writes resumed (on the new master)")
    master.close()
    return FailoverResult(group.name, old, new, offset)


def _give_up(group: _Group, master: redis.Redis, old: Address, say: Callable[[str], None]) -> None:
    """Undo the pause after a failure before the failover was asked. A pause longer than the
    sentinels' ``down-after-milliseconds`` makes them fail the master over on their own (their
    hello ``PUBLISH`` waits behind it, and their pings behind that): then the old master is made
    a replica of theirs before it takes writes again, as after a failover of ours."""
    named = {n for n in group.views().values() if n is not None}
    if len(named) == 1 and old not in named:
        new = named.pop()
        master.replicaof(new[0], str(new[1]))
        master.client_unpause()
        say(f"the sentinels failed over on their own: {_show(old)} is a replica of {_show(new)}")
        return
    master.client_unpause()
    say(f"writes resumed on {_show(old)} (still the master)")


def _caught_up(master: redis.Redis, replicas: int) -> int | None:
    """The master's offset once ``replicas`` replicas hold all of it, else ``None``."""
    info = master.info("replication")
    offset = int(info["master_repl_offset"])
    held = [r for r in _replicas(info) if r.get("state") == "online" and int(r.get("offset", -1)) >= offset]
    return offset if len(held) >= replicas else None


def _ask_failover(group: _Group) -> Address:
    """The first sentinel that accepts ``SENTINEL FAILOVER``; the last refusal when none does."""
    last: Exception | None = None
    for addr in group.parsed.sentinels:
        try:
            with group.sentinel(addr) as client:
                client.execute_command("SENTINEL", "FAILOVER", group.name)
            return addr
        except redis.ResponseError as exc:
            if "INPROG" in str(exc):
                return (
                    addr  # the sentinels began one themselves (the pause outlasted down-after): wait for it
                )
            last = exc
        except redis.RedisError as exc:
            last = exc
    raise ItrainError(f"no sentinel accepted SENTINEL FAILOVER {group.name}: {last}")
