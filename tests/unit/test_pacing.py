"""Paced sending (``itrain produce`` and the benchmark): slices, order, send times, the clock."""

from __future__ import annotations

import time
from collections.abc import Sequence

from worker.devtools.pacing import send_paced, slice_size


def test_slice_size_is_a_twentieth_of_a_second_or_5000() -> None:
    assert slice_size(None) == 5000
    assert slice_size(500.0) == 25
    assert slice_size(3.0) == 1


def test_send_paced_sends_every_item_once_in_order_in_slices() -> None:
    calls: list[list[int]] = []
    progress: list[int] = []

    def send(part: Sequence[int]) -> list[str]:
        calls.append(list(part))
        return [f"h{i}" for i in part]

    handles, sent_at = send_paced(list(range(11)), send, rate=None, size=4, on_sent=progress.append)
    assert calls == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10]]
    assert handles == [f"h{i}" for i in range(11)]
    assert progress == [4, 8, 11]
    assert len(sent_at) == 11
    assert sent_at == sorted(sent_at)
    assert sent_at[0] == sent_at[3]  # one time per slice


def test_send_paced_never_sends_a_slice_before_its_time() -> None:
    # 10 items at 100 items/s in slices of 2: slice k is due 20 ms * k after the first
    starts: list[float] = []
    send_paced(
        list(range(10)), lambda part: starts.append(time.perf_counter()) or list(part), rate=100.0, size=2
    )
    for k, t in enumerate(starts):
        assert t - starts[0] >= 0.02 * k - 0.001, (k, t - starts[0])
