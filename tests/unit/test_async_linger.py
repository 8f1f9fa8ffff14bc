"""The asyncio client's linger sends its batches in the order they were started."""

from __future__ import annotations

import asyncio
from typing import Any

from producer.async_linger import AsyncLinger
from producer.celery_config import make_celery
from producer.linger import LingerBuffers
from producer.settings import Settings


def _linger(queued: list[list[str]], slow_first: float) -> AsyncLinger:
    calls = 0

    async def publish(build: Any, event_ids: list[str]) -> None:
        nonlocal calls
        calls += 1
        if calls == 1:  # the first batch's round trip is slow (a loaded host, a busy Redis)
            await asyncio.sleep(slow_first)
        build(lambda model: "q")  # its messages, as the client makes them (one queue)
        queued.append(list(event_ids))

    settings = Settings()
    buffers = LingerBuffers(
        make_celery(settings, main="itrain-producer", producer=True),
        queue="q",
        linger_ms=1,
        max_events=3,
        max_message_bytes=1 << 20,
    )
    return AsyncLinger(publish, buffers)


def test_a_batch_filled_while_the_timers_batch_is_sent_is_queued_after_it() -> None:
    queued: list[list[str]] = []

    async def main() -> None:
        linger = _linger(queued, slow_first=0.2)
        # Given an event whose 1 ms linger runs out, so the timer starts its send (a slow one)
        await linger.add("t0", b'{"n":0}', "e0", ignored=False)
        await asyncio.sleep(0.05)
        # When three more fill the next batch, whose send starts at once, and a flush follows
        for i in (1, 2, 3):
            await linger.add(f"t{i}", b'{"n":%d}' % i, f"e{i}", ignored=False)
        await linger.add("t4", b'{"n":4}', "e4", ignored=False)
        await linger.flush()

    asyncio.run(main())
    # Then the batches reached the queue in the order their events were added
    assert queued == [["e0"], ["e1", "e2", "e3"], ["e4"]]
