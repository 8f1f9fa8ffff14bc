"""``FetchWindow``: the wait between a wake-up and its fetch follows the arrival rate."""

from __future__ import annotations

import pytest

from worker.consume.fetch_window import FetchWindow


def _fed(rate: float, seconds: float, window: FetchWindow, start: float = 100.0) -> float:
    """Feed ``window`` one message every 1/rate s for ``seconds``; the time of the last."""
    now, step = start, 1.0 / rate
    for _ in range(int(seconds * rate)):
        now += step
        window.taken(1, now)
    return now


def test_a_fresh_window_fetches_at_once() -> None:
    assert FetchWindow(0.01).delay(5.0) == 0.0


def test_a_fast_stream_opens_the_window_and_a_slow_one_does_not() -> None:
    # At 500 messages/s a 10 ms window gathers ~5 (>= 2): wait it out
    fast = FetchWindow(0.01)
    now = _fed(500, 1.0, fast)
    assert fast.rate(now) == pytest.approx(500, rel=0.05)
    assert fast.delay(now) == 0.01
    # At 50/s it would gather 0.5: fetch at once
    slow = FetchWindow(0.01)
    now = _fed(50, 1.0, slow)
    assert slow.delay(now) == 0.0


def test_the_threshold_is_what_the_window_would_gather() -> None:
    # 2 messages in 10 ms is 200/s: just above it waits, just below it does not
    above, below = FetchWindow(0.01), FetchWindow(0.01)
    assert above.delay(_fed(220, 2.0, above)) == 0.01
    assert below.delay(_fed(180, 2.0, below)) == 0.0


def test_a_quiet_spell_closes_the_window() -> None:
    window = FetchWindow(0.01)
    now = _fed(1000, 0.5, window)
    assert window.delay(now) == 0.01
    # After a second with nothing taken, the rate has decayed to nothing
    assert window.delay(now + 1.0) == 0.0


def test_a_gathered_fetch_counts_every_message_it_took() -> None:
    # Ten fetches of 10 messages, 20 ms apart: 500/s, as ten times ten single fetches would be
    window = FetchWindow(0.01)
    now = 100.0
    for _ in range(50):
        now += 0.02
        window.taken(10, now)
    assert window.rate(now) == pytest.approx(500, rel=0.25)
    assert window.delay(now) == 0.01


def test_another_workers_window_counts_as_a_fast_stream() -> None:
    # Two workers taking turns each take part of the stream: one that found the other gathering
    # waits too, whatever it took itself, until that news is a horizon old
    window = FetchWindow(0.01, horizon=0.25)
    assert window.delay(100.0) == 0.0
    window.others_gather(100.0)
    assert window.delay(100.1) == 0.01
    assert window.delay(100.3) == 0.0


def test_no_window_means_never_waiting() -> None:
    window = FetchWindow(0.0)
    assert window.delay(_fed(5000, 0.5, window)) == 0.0


def test_nonsense_is_refused() -> None:
    with pytest.raises(ValueError, match="fetch window"):
        FetchWindow(-1.0)
    with pytest.raises(ValueError, match="fetch window"):
        FetchWindow(0.01, horizon=0.0)


def test_a_takers_share_of_a_fast_stream_opens_the_window_once_told_the_whole() -> None:
    # Given a taker that took 150 messages/s: its half of a 300/s stream shared with another
    window = FetchWindow(0.01)
    now = _fed(150, 1.0, window)
    assert window.delay(now) == 0.0
    # When it is told that the queue's takers together took 300/s
    window.shared(300.0, now)
    # Then the window follows the whole stream (3 messages in 10 ms), for the horizon
    assert window.rate(now) == pytest.approx(300)
    assert window.delay(now) == 0.01
    # And a told rate lower than its own changes nothing, and is forgotten after the horizon
    window.shared(10.0, now)
    assert window.rate(now) == pytest.approx(150, rel=0.05)
    window.shared(300.0, now)
    assert window.rate(now + window.horizon + 0.001) < 150
