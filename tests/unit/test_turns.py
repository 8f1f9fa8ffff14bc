"""``worker.consume.turns``: pool jobs take turns by queue (the pool is a stand-in that records
what it was handed; the real pool is exercised by tests/integration/test_queues.py and
tests/reliability/test_noisy_neighbour.py)."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Callable
from functools import partial
from typing import Any

from worker.consume import turns as turns_module
from worker.consume.turns import Turns


class _Pool:
    def __init__(self, processes: int) -> None:
        self.num_processes = processes


class _Owner:
    """Records each job it is asked to start; ``finish()`` ends the oldest running one."""

    def __init__(self, name: str, max_events: int = 1024) -> None:
        self.name = name
        self.max = max_events
        self.started: list[list[Any]] = []
        self.running: list[Callable[[], None]] = []

    def start(self, items: list[Any], alone: bool, finished: Callable[[], None]) -> None:
        self.started.append(list(items))
        self.running.append(finished)

    def finish(self) -> None:
        self.running.pop(0)()


def test_a_flooded_queue_takes_turns_with_a_quiet_one() -> None:
    # Given a pool of one process, and queue A alone with ten micro-batches waiting
    turns = Turns(_Pool(1))
    a, b = _Owner("a"), _Owner("b")
    for i in range(10):
        turns.submit("A", a, [f"a{i}"], 256)
    # Then the pool holds one job per process and one more; A's others wait in its line
    assert a.started == [["a0"], ["a1"]]
    # When B's lone event arrives
    turns.submit("B", b, ["b0"], 1)
    # Then it runs right after the jobs the pool already holds, not after A's whole line
    a.finish()
    assert b.started == []
    a.finish()
    assert b.started == [["b0"]]
    b.finish()
    # And A's next job is a quarter of a job while both queues are active (one chunk of 256)
    assert a.started[-1] == ["a2"]


def test_a_turn_merges_a_queues_waiting_micro_batches_up_to_one_job() -> None:
    # Given a pool that holds all it may, and many small micro-batches of one queue waiting
    turns = Turns(_Pool(1))
    busy, b = _Owner("busy"), _Owner("b", max_events=8)
    turns.submit("B", busy, ["x"], 1)
    turns.submit("B", busy, ["y"], 1)
    for i in range(12):
        turns.submit("B", b, [f"b{i}"], 1)
    busy.finish()
    # Then its turn takes a job's worth of them at once (8 events), keeping their order
    assert b.started == [[f"b{i}" for i in range(8)]]
    busy.finish()
    assert b.started[-1] == [f"b{i}" for i in range(8, 12)]


def test_while_queues_share_the_pool_one_process_stays_for_the_quiet_ones(monkeypatch: Any) -> None:
    # Given two processes and both queues active
    turns = Turns(_Pool(2))
    a, b = _Owner("a"), _Owner("b")
    turns.submit("B", b, ["b0"], 1)
    b.finish()
    for i in range(6):
        turns.submit("A", a, [f"a{i}"], 256)
    # Then A holds one process, not both
    assert len(a.running) == 1
    # And B's next event starts at once on the other
    turns.submit("B", b, ["b1"], 1)
    assert b.started[-1] == ["b1"]
    # When B has been quiet for longer than SHARED_FOR, A may use every process again (and
    # one job more)
    monkeypatch.setattr(turns_module, "SHARED_FOR", 0.0)
    b.finish()
    assert len(a.running) == 3
    # And its jobs are whole again (four chunks)
    assert a.started[-2] == [f"a{i}" for i in range(1, 5)]


class _Handle:
    """What billiard's ``ApplyResult`` shows ``Turns``: its id in the pool's cache, ``ready()``."""

    def __init__(self, cache: dict[int, Any], job: int) -> None:
        self._cache = cache
        self._job = job
        cache[job] = self

    def ready(self) -> bool:
        return False


class _PoolOwner(_Owner):
    """``_Owner`` whose jobs are in a pool cache that a reconnect may empty (``AsynPool.flush``)."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.cache: dict[int, Any] = {}

    def start(self, items: list[Any], alone: bool, finished: Callable[[], None]) -> Any:
        super().start(items, alone, finished)
        return _Handle(self.cache, len(self.started))


def test_jobs_the_pool_dropped_at_a_reconnect_free_their_turns() -> None:
    # Given a pool of one process holding its two jobs (one running, one waiting for it)
    turns = Turns(_Pool(1))
    a = _PoolOwner("a")
    for i in range(2):
        turns.submit("q", a, [i], 1)
    assert len(a.started) == 2
    turns.submit("q", a, [2], 1)
    assert len(a.started) == 2  # full: the third waits
    # When a reconnect makes the pool drop both without running their callbacks
    a.cache.clear()
    turns.submit("q", a, [3], 1)
    # Then the waiting micro-batches are handed to the pool, and it counts only those
    assert a.started[2:] == [[2, 3]]
    assert turns.running == 1
    assert turns.running_by == {"q": 1}
    # And a late callback of a dropped job (never sent by the pool, but harmless) counts nothing
    a.running[0]()
    assert turns.running == 1


def test_jobs_still_in_the_pool_keep_their_turns() -> None:
    # Given a full pool of one process whose jobs are still in the pool's cache
    turns = Turns(_Pool(1))
    a = _PoolOwner("a")
    for i in range(3):
        turns.submit("q", a, [i], 1)
    # Then the third waits until a job's callback runs
    assert len(a.started) == 2
    a.finish()
    assert a.started[2] == [2]
    assert turns.running == 2


def test_a_finished_job_is_freed_by_reference_counting_not_left_to_the_garbage_collector() -> None:
    # Given a pool whose handle keeps the job's callback, as billiard's ApplyResult does (its
    # callback holds ``finished``, which holds Turns' record of the job, which holds the handle)
    class Handle:
        def __init__(self, finished: Callable[[], None]) -> None:
            self.finished = finished

    class Owner:
        max = 1024

        def __init__(self) -> None:
            self.handles: list[Handle] = []

        def start(self, items: list[Any], alone: bool, finished: Callable[[], None]) -> Handle:
            self.handles.append(Handle(partial(_keep, items, finished)))
            return self.handles[-1]

    class Item:
        pass

    turns, owner = Turns(_Pool(1)), Owner()
    item = Item()
    gone = weakref.ref(item)
    gc.disable()  # only reference counting may free it
    try:
        turns.submit("A", owner, [item], 1)
        del item
        # When the job ends and the pool lets go of its handle
        owner.handles.pop().finished()
        # Then its items are gone at once: no cycle holds them until a collection (in the worker's
        # main process, each job's kombu messages waited for one: 20-100 ms pauses under load)
        assert gone() is None
    finally:
        gc.enable()


def _keep(items: list[Any], finished: Callable[[], None]) -> None:
    finished()


def test_room_is_a_free_process_with_no_job_waiting_and_its_waiters_hear_when_it_frees(
    monkeypatch: Any,
) -> None:
    # Given this process's one pool of one process, idle
    monkeypatch.setattr(turns_module, "_TURNS", weakref.WeakKeyDictionary())
    monkeypatch.setattr(turns_module, "_room_waiters", [])
    pool = _Pool(1)
    turns = turns_module.turns_for(pool)
    owner = _Owner("a")
    assert turns.has_room()
    assert turns_module.pool_has_room()
    # When a job runs, and another waits behind it in the pool
    turns.submit("A", owner, ["a0"], 1)
    turns.submit("A", owner, ["a1"], 1)
    # Then there is no room, and a transport that asks to hear of it is told only once a job
    # ends with the pool free: not when the next job takes the process at once
    assert not turns_module.pool_has_room()
    heard: list[str] = []
    turns_module.when_room(lambda: heard.append("room"))
    owner.finish()
    assert heard == []
    assert not turns_module.pool_has_room()
    owner.finish()
    assert heard == ["room"]
    assert turns_module.pool_has_room()
    # And once only
    turns.submit("A", owner, ["a2"], 1)
    owner.finish()
    assert heard == ["room"]
