"""Which server the sentinels name as the master, leaving out a sentinel in the middle of a failover.

The sentinel that leads a failover keeps the old master's address in ``SENTINEL MASTERS`` from the
moment it promotes a replica until its failover ends: until every replica is reconfigured, or
``failover-timeout`` runs out (1-3 s measured after ``itrain failover``; up to the timeout when a
replica is slow or gone). Its peers name the promoted replica within ~0.1 s of the promotion.
redis-py takes the first sentinel's answer and moves the sentinel that answered to the front of
its list, so a client whose first sentinel led the failover (the one ``itrain failover`` asked is
the first of the URL, as a client's first usually is) reconnected to the demoted server over and
over: every new connection answered ``READONLY`` and was dropped again. A worker's consumer
restarted about six times in a second that way (Celery's ``RestartFreqExceeded``, then a 1 s
sleep), and producers retried against the old master until the leader's failover ended.

So an answer whose master is flagged ``failover_in_progress`` is used only when no sentinel gives
another: a master is then still found while the leader alone answers.
"""

from __future__ import annotations

from typing import Any

import redis.asyncio.sentinel as aiosentinel
import redis.sentinel
from redis.exceptions import ConnectionError, ResponseError, TimeoutError

__all__ = ["AsyncFailoverAwareSentinel", "FailoverAwareSentinel", "failing_over"]

#: The flag a sentinel sets on a master whose failover it leads.
FAILOVER_IN_PROGRESS = "failover_in_progress"

#: What a sentinel that cannot be asked raises (redis-py's own list in ``discover_master``).
_UNANSWERED = (ConnectionError, ResponseError, TimeoutError)


def failing_over(state: dict[str, Any]) -> bool:
    """Whether a ``SENTINEL MASTERS`` entry says that this sentinel is failing the master over
    (``flags`` is a comma-separated string over RESP2, a set over RESP3)."""
    flags = state.get("flags") or ()
    if isinstance(flags, str):
        flags = flags.split(",")
    return FAILOVER_IN_PROGRESS in flags


def _pick(answers: list[tuple[int, dict[str, Any]]]) -> tuple[int, dict[str, Any]] | None:
    """The first answer from a sentinel not in a failover, else the first answer."""
    for answer in answers:
        if not failing_over(answer[1]):
            return answer
    return answers[0] if answers else None


def _chosen(
    owner: Any, service_name: str, answers: list[tuple[int, dict[str, Any]]], errors: list[str]
) -> tuple[str, int]:
    """The master's address from the answer ``_pick`` takes (``MasterNotFoundError`` when none);
    as redis-py does, the sentinel that gave it is asked first next time. ``owner``: the sync or
    the asyncio ``Sentinel``, which keep their sentinels and forced address alike."""
    picked = _pick(answers)
    if picked is None:
        raise _not_found(service_name, errors)
    number, state = picked
    owner.sentinels[0], owner.sentinels[number] = owner.sentinels[number], owner.sentinels[0]
    ip = owner._force_master_ip if owner._force_master_ip is not None else state["ip"]
    return ip, int(state["port"])


def _not_found(service_name: str, errors: list[str]) -> redis.sentinel.MasterNotFoundError:
    info = f" : {', '.join(errors)}" if errors else ""
    return redis.sentinel.MasterNotFoundError(f"No master found for {service_name!r}{info}")


def _unanswered(sentinel: Any, exc: BaseException) -> str:
    return f"{sentinel} - {exc!r}" + (f": {exc}" if str(exc) else "")


class FailoverAwareSentinel(redis.sentinel.Sentinel):
    """redis-py's ``Sentinel``, whose master discovery passes over a sentinel that is failing the
    master over while another names a master (see the module's docstring)."""

    def discover_master(self, service_name: str) -> tuple[str, int]:
        answers: list[tuple[int, dict[str, Any]]] = []
        errors: list[str] = []
        for number, sentinel in enumerate(self.sentinels):
            try:
                masters: Any = sentinel.sentinel_masters()  # name -> state
            except _UNANSWERED as exc:
                errors.append(_unanswered(sentinel, exc))
                continue
            state = masters.get(service_name)
            if state and self.check_master_state(state, service_name):  # type: ignore[no-untyped-call]
                if not failing_over(state):
                    answers = [(number, state)]
                    break  # the others need not be asked
                answers.append((number, state))
        return _chosen(self, service_name, answers, errors)


class AsyncFailoverAwareSentinel(aiosentinel.Sentinel):
    """``FailoverAwareSentinel`` for ``redis.asyncio``."""

    async def discover_master(self, service_name: str) -> tuple[str, int]:
        answers: list[tuple[int, dict[str, Any]]] = []
        errors: list[str] = []
        for number, sentinel in enumerate(self.sentinels):
            try:
                masters: Any = await sentinel.sentinel_masters()  # name -> state
            except _UNANSWERED as exc:
                errors.append(_unanswered(sentinel, exc))
                continue
            state = masters.get(service_name)
            if state and self.check_master_state(state, service_name):
                if not failing_over(state):
                    answers = [(number, state)]
                    break
                answers.append((number, state))
        return _chosen(self, service_name, answers, errors)
