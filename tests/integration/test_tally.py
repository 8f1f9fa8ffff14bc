"""``worker/consume/lua/tally.lua`` against a real Redis: what each pool fetcher of a queue took
adds up to the queue's take rate, over the buckets remembered (Redis's clock)."""

from __future__ import annotations

import time
import uuid
from typing import Any

import redis

from worker.consume.transport import TALLY, Channel

WIDTH_MS, BUCKETS = 50, 4


def _tell(client: redis.Redis, key: str, taken: int) -> tuple[int, int]:
    reply: Any = client.eval(TALLY.text, 1, key, taken, WIDTH_MS, BUCKETS)
    return int(reply[0]), int(reply[1])


def test_what_every_fetcher_took_adds_up_and_old_buckets_are_forgotten(redis_client: redis.Redis) -> None:
    key = Channel.tally_key % f"itrain.t{uuid.uuid4().hex[:6]}"
    # Given a queue nobody took from: nothing, over at least the buckets remembered
    total, ms = _tell(redis_client, key, 0)
    assert total == 0
    assert BUCKETS * WIDTH_MS <= ms < (BUCKETS + 1) * WIDTH_MS
    # When two fetchers tell what they took, one twice
    _tell(redis_client, key, 3)
    _tell(redis_client, key, 4)
    total, _ = _tell(redis_client, key, 5)
    # Then the tally is their sum
    assert total == 12
    # And once the buckets remembered have passed, it is forgotten, and the key stays small
    time.sleep((BUCKETS + 1) * WIDTH_MS / 1000 + 0.02)
    assert _tell(redis_client, key, 1)[0] == 1
    assert redis_client.hlen(key) <= BUCKETS + 1
    assert 0 < redis_client.pttl(key) <= (BUCKETS + 2) * WIDTH_MS
