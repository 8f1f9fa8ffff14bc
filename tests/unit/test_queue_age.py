"""A queue head's age, as the exporter reads it (``worker.ops.queue_age``): pure, no Redis."""

from __future__ import annotations

import hashlib

import orjson

from producer.enqueue_time import ENQUEUED_HEADER
from worker.ops.queue_age import HeadAges


def _head(enqueued: float | None) -> bytes:
    headers: dict[str, object] = {"task": "itrain.train_step", "id": "t1"}
    if enqueued is not None:
        headers[ENQUEUED_HEADER] = enqueued
    return orjson.dumps({"body": "e30=", "headers": headers, "properties": {"delivery_tag": "t1"}})


NOW = 1_765_000_100.0


def test_an_empty_queue_is_0_and_a_stamped_head_ages_from_its_enqueue_time() -> None:
    ages = HeadAges()
    assert ages.age("q", None, None, NOW) == 0.0
    assert ages.age("q", _head(NOW - 42.5), None, NOW) == 42.5
    # (a producer's clock ahead of Redis's: never a negative age)
    assert ages.age("q", _head(NOW + 3.0), None, NOW) == 0.0


def test_an_unstamped_head_ages_from_the_workers_note_of_that_very_message() -> None:
    head = _head(None)
    note = f"{hashlib.sha1(head).hexdigest()} {NOW - 7.25}".encode()
    assert HeadAges().age("q", head, note, NOW) == 7.25


def test_without_a_note_of_that_message_the_exporter_counts_from_its_own_first_sight() -> None:
    # Given a note of another message (the head moved on since), and no note at all
    ages, head = HeadAges(), _head(None)
    stale = f"{'0' * 40} {NOW - 500}".encode()
    # When the exporter sees the head now, and again 5 s later
    first = ages.age("q", head, stale, NOW)
    later = ages.age("q", head, None, NOW + 5.0)
    # Then its age counts from the first scrape that saw it, not from the stale note
    assert (first, later) == (0.0, 5.0)
    # And a new head starts again; an empty queue forgets
    assert ages.age("q", b"not json at all", None, NOW + 6.0) == 0.0
    assert ages.age("q", None, None, NOW + 7.0) == 0.0
    assert ages.age("q", head, None, NOW + 8.0) == 0.0
