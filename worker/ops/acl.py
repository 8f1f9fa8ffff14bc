"""``itrain acl``: least-privilege Redis users, one per role, as ``ACL SETUSER`` lines.

- ``producer``, for services that publish events and wait for results: push to and measure the
  queues (and ``WAIT`` for replicas, ``ITRAIN_MIN_REPLICAS``), read the routes (``itrain:routes``:
  which queue each model's events go to), read and subscribe to job results. Every queue is
  ``ITRAIN_QUEUE`` or ``<ITRAIN_QUEUE>.<suffix>`` (``producer.routes``), so ``~<queue>`` and
  ``~<queue>.*`` cover them all; ``itrain acl --queues`` limits the role to some of them (a push
  to another then answers ``NOPERM``: ``PermissionDeniedError``).
- ``reader``, for services that also read a model (``client.stats()``, in-process prediction):
  the producer's rights, and read (never write) every model's keys.
- ``monitor``, for ``itrain exporter``: read every model's keys, the queue's length, the
  unacknowledged messages, ``INFO``.
- ``worker``, for ``celery -A worker worker``, ``itrain init`` and ``itrain migrate``: every key
  and channel, no administrative command.
- ``sentinel``, run on every sentinel of a ``sentinel://`` URL, for every component
  (``ITRAIN_SENTINEL_USERNAME``): ask where the master is, nothing else (no key, no channel).

Every role that reads the store (reader, monitor, worker) may read its layout, ``itrain:layout``
(``producer.formats``: the worker and the ``itrain`` commands check it when they start); writing
it (``itrain init``, ``itrain migrate``) is the worker's.

Read-only access uses Redis 7's ``%R~`` key permission: the producer and the reader can never
write a checkpoint (``HSET``, ``DEL`` or a script on ``itrain:{m}:ckpt`` answer ``NOPERM``). Each
role was derived by a test that runs every path of the role as such a user and finds Redis's
``ACL LOG`` empty (``tests/integration/test_acl.py``).
"""

from __future__ import annotations

import secrets
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import redis

from producer.keys import ROUTES

__all__ = ["ROLES", "Role", "acl_lines", "unknown_commands"]

#: What every connection of redis-py and Celery sends, whatever the role.
_CONNECTION = ("+ping", "+client|setinfo", "+client|setname", "+client|id", "+hello", "+select", "+quit")


@dataclass(frozen=True)
class Role:
    description: str
    commands: tuple[str, ...]
    #: Key patterns, ``{queue}`` standing for ``ITRAIN_QUEUE``.
    keys: tuple[str, ...]
    channels: tuple[str, ...] = ()
    #: How a component logs in as such a user (the comment line's end).
    login: str = "connect as redis://{user}:<password>@<host>:6379/0"


_PRODUCER = Role(
    "publish events and read job results",
    (
        *_CONNECTION,
        # train_step / train_many (all chunks in one MULTI) and queue_length
        "+lpush",
        "+llen",
        # the routes, read at most once per ITRAIN_ROUTES_TTL
        "+hgetall",
        # ITRAIN_MIN_REPLICAS: WAIT after the push, on the same connection
        "+wait",
        "+multi",
        "+exec",
        "+discard",
        # predict (Celery's own publishing: the queue's binding, then the push)
        "+sadd",
        "+smembers",
        # predict's task-sent event (Flower), published by Celery on the celeryev channel
        "+publish",
        # job results: read, and waited on through their channels
        "+get",
        "+mget",
        "+subscribe",
        "+unsubscribe",
    ),
    # (Celery's predict also measures the queue's priority lists, <queue>\x06\x16<digit>: ``??[0-9]``
    # matches them and no model key; ``{queue}*`` would match every ``itrain:...`` key too.)
    (
        "~{queue}",
        "%R~{queue}??[0-9]",
        # every model's own queue, <queue>.<suffix>, and its priority lists
        "~{queue}.*",
        "%R~" + ROUTES,
        "~_kombu.binding.*",
        "~_kombu.binding_permanent.*",
        "%R~celery-task-meta-*",
    ),
    ("&celery-task-meta-*", "&/*.celeryev/*"),
)

_READ_MODELS = (
    "+hget",
    "+hmget",
    "+hgetall",
    "+hlen",
    "+llen",
    "+lrange",
    "+smembers",
    "+exists",
    "+info",
    "+get",
)

#: What redis-py, kombu, Celery and Flower send to a sentinel: the connection's setup, the
#: master's address (``SENTINEL MASTERS``, and the named ones for other clients), the replicas.
_SENTINEL = Role(
    "ask the sentinels where the master is (run it on every sentinel)",
    (
        "+ping",
        "+auth",
        "+hello",
        "+client|setinfo",
        "+client|setname",
        "+client|id",
        "+sentinel|masters",
        "+sentinel|master",
        "+sentinel|get-master-addr-by-name",
        "+sentinel|sentinels",
        "+sentinel|replicas",
        "+sentinel|slaves",
    ),
    (),
    login="set ITRAIN_SENTINEL_USERNAME={user} and ITRAIN_SENTINEL_PASSWORD=<password>",
)

ROLES: dict[str, Role] = {
    "producer": _PRODUCER,
    "reader": Role(
        "publish events, read job results, and read (never write) every model",
        (*_PRODUCER.commands, *_READ_MODELS),
        (*_PRODUCER.keys, "%R~itrain:*"),
        _PRODUCER.channels,
    ),
    "monitor": Role(
        "itrain exporter: read every model, the queues' lengths and heads, INFO",
        # LINDEX: a queue's head (its age), TIME: Redis's clock
        (*_CONNECTION, *_READ_MODELS, "+lindex", "+time"),
        ("%R~itrain:*", "%R~{queue}", "%R~{queue}.*", "%R~unacked"),
    ),
    "worker": Role(
        "train: every key and channel, no administrative command",
        (*_CONNECTION, "+@all", "-@admin", "-@dangerous", "+info", "+client|setinfo", "+client|setname"),
        ("~*",),
        ("&*",),
    ),
    "sentinel": _SENTINEL,
}


def _queue_keys(patterns: Sequence[str], queue: str, queues: Sequence[str] | None) -> list[str]:
    """The role's key patterns for ``queue``; with ``queues``, each ``{queue}`` pattern once per
    queue given, and the one for every model's queue (``{queue}.*``) left out."""
    if queues is None:
        return [k.replace("{queue}", queue) for k in patterns]
    keys: list[str] = []
    for pattern in patterns:
        if pattern.endswith("{queue}.*"):
            continue
        if "{queue}" in pattern:
            keys += [pattern.replace("{queue}", q) for q in dict.fromkeys(queues)]
        else:
            keys.append(pattern)
    return keys


def unknown_commands(client: redis.Redis) -> set[str]:
    """The subcommands the roles name that ``client``'s server does not have (by its version:
    ``CLIENT SETINFO`` came with Redis 7.2)."""
    version = tuple(int(p) for p in str(client.info("server")["redis_version"]).split(".")[:2])
    return {"client|setinfo"} if version < (7, 2) else set()


def acl_lines(
    role: str,
    user: str,
    queue: str,
    password: str | None = None,
    unknown: Collection[str] = (),
    *,
    queues: Sequence[str] | None = None,
) -> list[str]:
    """The ``ACL SETUSER`` command for ``user`` in ``role`` (a comment line first). A random
    password is made when none is given; the user starts from nothing (``reset``). ``unknown``:
    commands the target server does not have (``client|setinfo`` before Redis 7.2), left out
    because ``ACL SETUSER`` refuses to name them. ``queues``: the only queues the role may push
    to and measure (default: ``queue`` and every ``<queue>.<suffix>``)."""
    spec = ROLES[role]
    secret = password or secrets.token_urlsafe(24)
    keys = _queue_keys(spec.keys, queue, queues)
    commands = [c for c in dict.fromkeys(spec.commands) if c[1:] not in unknown]
    parts = ["ACL", "SETUSER", user, "reset", "on", f">{secret}", *keys, *spec.channels, *commands]
    return [
        f"# {role}: {spec.description}; {spec.login.format(user=user)}",
        " ".join(parts),
    ]
