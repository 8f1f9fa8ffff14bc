"""``itrain migrate``: bring a store's layout up to the one this release writes.

A store's layout is the value of ``itrain:layout`` (absent: layout 1; ``producer.formats``). Each
step of ``STEPS`` takes a store from one layout to the next and says whether workers of the
older release may keep running while and after it runs (``online``); a step that is not online
is a stop-the-world step: stop every worker, migrate, start workers of the new release.

The key is written last, in a transaction that checks it still holds the layout the step started
from, so a migration that stops half-way is run again from its start, and two ``itrain migrate``
running at once write it once. Running it again on a migrated store changes nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import redis

from producer.errors import ConfigurationError, StoreLayoutError
from producer.formats import STORE_LAYOUT, check_layout, parse_layout
from producer.keys import LAYOUT, MODELS
from producer.redis_conn import connect, redact_url
from producer.settings import Settings

__all__ = [
    "STEPS",
    "Migration",
    "Step",
    "check_store_layout",
    "migrate",
    "plan_migration",
    "read_layout",
    "stamp_new_store",
]


@dataclass(frozen=True)
class Step:
    """One layout's migration to the next."""

    source: int  # the layout it reads; it writes ``source + 1``
    what: str  # what it changes, for ``itrain migrate`` to print
    #: Whether workers of the ``source`` layout's release may run during and after it.
    online: bool
    #: The changes besides the layout key (run before the key is written; safe to run again).
    apply: Callable[[redis.Redis], None]


def _nothing(client: redis.Redis) -> None:
    """Layout 2 changes no key or field of layout 1."""


STEPS: tuple[Step, ...] = (
    Step(
        1,
        f"write {LAYOUT} = 2; no other key or field changes (layout 2 is layout 1 with its version recorded)",
        online=True,
        apply=_nothing,
    ),
)


@dataclass(frozen=True)
class Migration:
    """What ``migrate`` found and the steps that take the store to ``STORE_LAYOUT``."""

    found: int
    steps: tuple[Step, ...]

    @property
    def target(self) -> int:
        return self.steps[-1].source + 1 if self.steps else self.found

    @property
    def online(self) -> bool:
        """Whether every step may run while workers of the older releases run."""
        return all(step.online for step in self.steps)


def plan_migration(client: redis.Redis, where: str) -> Migration:
    """The store's layout and the steps up to ``STORE_LAYOUT``; ``StoreLayoutError`` (naming
    ``where``) for a layout newer than this release reads, or an unreadable key."""
    found = check_layout(read_layout(client), where)
    return Migration(found, tuple(step for step in STEPS if step.source >= found))


def migrate(client: redis.Redis, where: str) -> Migration:
    """Run every step of ``plan_migration``; returns the plan that ran. ``StoreLayoutError`` when
    the key changed under it to something other than the step's target (another release wrote)."""
    plan = plan_migration(client, where)
    for step in plan.steps:
        step.apply(client)
        _write_layout(client, step.source, step.source + 1, where)
    return plan


def _write_layout(client: redis.Redis, source: int, target: int, where: str) -> None:
    def write(pipe: redis.client.Pipeline) -> None:
        found = parse_layout(pipe.get(LAYOUT))
        if found == target:
            return  # another migrate wrote it first
        if found != source:
            raise StoreLayoutError(f"the {where}'s layout changed to {found} while migrating from {source}")
        pipe.multi()
        pipe.set(LAYOUT, str(target))

    client.transaction(write, LAYOUT)


def stamp_new_store(client: redis.Redis) -> bool:
    """Write ``STORE_LAYOUT`` into a store that holds no model and no layout key yet (``itrain
    init`` on a new store); returns whether it did. A store that already holds models is left for
    ``itrain migrate``, whose steps may need workers stopped."""

    stamped = [False]

    def stamp(pipe: redis.client.Pipeline) -> None:
        stamped[0] = False
        if pipe.exists(LAYOUT) or pipe.scard(MODELS) > 0:
            return
        pipe.multi()
        pipe.set(LAYOUT, str(STORE_LAYOUT))
        stamped[0] = True

    client.transaction(stamp, LAYOUT, MODELS)
    return stamped[0]


def read_layout(client: redis.Redis) -> int:
    """The store's layout version (``UNREADABLE`` when the key holds something else)."""
    return parse_layout(client.get(LAYOUT))


def check_store_layout(settings: Settings) -> int:
    """The store's layout, checked (``check_layout``); the worker runs this at start, beside the
    server-version check, and so does every ``itrain`` command that reads the store. An
    unreachable store raises redis-py's error."""
    client = connect(settings.store, settings.publish_timeout)
    where = f"store Redis {redact_url(settings.store)}"
    try:
        return check_layout(read_layout(client), where)
    except (redis.ConnectionError, redis.TimeoutError):
        raise  # the caller's "cannot reach" line
    except redis.RedisError as exc:
        raise ConfigurationError(f"cannot read the layout of the {where} ({LAYOUT}): {exc}") from exc
    finally:
        client.close()
