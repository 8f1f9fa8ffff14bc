"""``worker/consume/lua/gather.lua`` against a real Redis: one worker at a time gathers a queue's
fetch window, and windows tile time (a window ends at most its length after the last one ended,
so a message that came between two windows waits no longer than the window for its fetch)."""

from __future__ import annotations

import uuid
from typing import Any

import redis

from worker.consume.transport import GATHER, Channel


def _keys() -> list[str]:
    queue = f"itrain.g{uuid.uuid4().hex[:6]}"
    return [Channel.gather_key % queue, Channel.gather_end_key % queue]


def _ask(client: redis.Redis, keys: list[str], node: str, window_ms: int) -> list[int]:
    reply: Any = client.eval(GATHER.text, 2, *keys, node, window_ms)
    return [int(x) for x in reply]


def _now_ms(client: redis.Redis) -> int:
    seconds, micros = client.time()
    return int(seconds) * 1000 + int(micros) // 1000


def test_one_worker_gathers_a_window_and_the_others_hear_how_long_it_lasts(redis_client: redis.Redis) -> None:
    keys = _keys()
    # Given a queue nobody gathers: the first worker to ask gets the whole window
    assert _ask(redis_client, keys, "w1", 5000) == [1, 5000]
    assert redis_client.get(keys[0]) == b"w1"
    # When another asks during it
    ours, left = _ask(redis_client, keys, "w2", 5000)
    # Then it is told what is left of the first one's, and the first keeps it
    assert ours == 0
    assert 0 < left <= 5000
    assert redis_client.get(keys[0]) == b"w1"


def test_a_window_asked_for_after_a_gap_is_shortened_by_the_gap(redis_client: redis.Redis) -> None:
    keys = _keys()
    # Given a queue whose last window ended 300 ms ago (no worker was free to gather since)
    redis_client.set(keys[1], _now_ms(redis_client) - 300)
    # When a worker asks for a window of 1,000 ms
    ours, window = _ask(redis_client, keys, "w1", 1000)
    # Then it gathers for what is left of 1,000 ms after that end: the messages that came in the
    # gap wait no longer than the window
    assert ours == 1
    assert 680 <= window <= 700
    # And the queue's last window now ends when this one does
    assert abs(int(redis_client.get(keys[1]) or 0) - (_now_ms(redis_client) + window)) <= 20


def test_after_a_gap_longer_than_the_window_the_worker_fetches_at_once(redis_client: redis.Redis) -> None:
    keys = _keys()
    redis_client.set(keys[1], _now_ms(redis_client) - 5000)
    # When a worker asks for 1,000 ms, five seconds after the last window ended
    # Then it is to fetch now, and holds no window (another may ask straight away)
    assert _ask(redis_client, keys, "w1", 1000) == [1, 0]
    assert redis_client.get(keys[0]) is None
