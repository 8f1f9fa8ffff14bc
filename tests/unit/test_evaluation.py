"""The online evaluation's pure parts: the AUC, the ring's placement of records (wrapping, a batch
longer than the window), sums since creation per action, the guard's windows and its rule."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from producer.errors import ConfigurationError
from producer.evaluation import MAX_ACTIONS, OTHER_ACTION, RECORD, auc, decode_ring, eval_report
from worker.engine.evaluation import COLUMNS, EvalState, advance, decode_state, guard_loss, recent_losses
from worker.engine.guard import Guard, Reference, Window, parse_guard, parse_reference, tripped, worst_window


def brute_auc(pairs: list[tuple[float, float]]) -> float:
    pos = [p for p, t in pairs if t == 1.0]
    neg = [p for p, t in pairs if t == 0.0]
    return sum((a > b) + 0.5 * (a == b) for a, b in itertools.product(pos, neg)) / (len(pos) * len(neg))


@pytest.mark.parametrize("seed", range(20))
def test_auc_equals_the_pairwise_count_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 40))
    preds = rng.choice([0.1, 0.2, 0.5, 0.7, 0.9], size=n).tolist()  # many ties
    targets = rng.choice([0.0, 1.0], size=n).tolist()
    pairs = list(zip(preds, targets, strict=True))
    if 0 < sum(targets) < n:
        assert auc(pairs) == pytest.approx(brute_auc(pairs), abs=1e-12)
    else:
        assert auc(pairs) is None


def replay(state: EvalState, batches: list[int], cap: int) -> tuple[EvalState, bytearray, list[float]]:
    """Advance through batches of the given sizes, applying each update's ring segments to a byte
    string as Redis's SETRANGE would; returns the state, the bytes and every loss in order."""
    ring = bytearray()
    losses: list[float] = []
    k = 0
    for n in batches:
        loss = np.arange(k, k + n, dtype=float) + 0.5
        P = np.full((n, 1), 0.8)
        Y = np.ones((n, 1))
        update = advance(state, P, Y, loss, ["click"] * n, guard_window=3)
        for offset, data in update.segments:
            ring.extend(bytes(max(0, offset + len(data) - len(ring))))
            ring[offset : offset + len(data)] = data
        state = update.state
        losses.extend(loss.tolist())
        k += n
    return state, ring, losses


@pytest.mark.parametrize("batches", [[1, 1, 1], [3, 4], [5, 2, 6], [12], [2, 9, 1, 1], [4, 4, 4, 4]])
def test_ring_holds_the_last_cap_events(batches: list[int]) -> None:
    cap = 5
    state, ring, losses = replay(EvalState(cap, ring=np.zeros((cap, COLUMNS))), batches, cap)
    records = decode_ring(bytes(ring), cap)
    wn = sum(batches)
    held = sorted(r[0] for r in records[: min(wn, cap)])
    assert held == sorted(losses[-cap:])
    # The worker's own copy of the ring equals what Redis would hold
    assert state.ring is not None
    np.testing.assert_array_equal(
        state.ring, np.frombuffer(bytes(ring).ljust(cap * RECORD.size, b"\0"), "<f8").reshape(cap, COLUMNS)
    )
    # The reference figure covers the whole window held; the guard's windows reach back 2 events
    assert guard_loss(state.ring, wn, 3) == pytest.approx(np.mean(losses[-cap:]) if wn >= 3 else None)
    np.testing.assert_array_equal(recent_losses(state.ring, wn, 2), losses[-2:])
    assert state.total[0] == wn
    assert state.total[1] == pytest.approx(sum(losses))


def test_guard_loss_needs_a_full_guard_window() -> None:
    ring = np.zeros((4, COLUMNS))
    ring[:3, 0] = [1.0, 3.0, 5.0]
    assert guard_loss(ring, 2, 3) is None
    assert guard_loss(ring, 2, 2) == 2.0
    assert guard_loss(ring, 3, 2) == 3.0  # over every event held, not only the guard's window
    assert guard_loss(ring, 2, 5) is None  # wider than the ring


def naive_windows(earlier: list[float], losses: list[float], window: int) -> dict[int, float]:
    """The mean of every full window that ends in the batch, by the position of its last event in
    the batch: one Python sum each."""
    seq = earlier + losses
    return {
        end - len(earlier): sum(seq[end - window + 1 : end + 1]) / window
        for end in range(len(earlier), len(seq))
        if end - window + 1 >= 0
    }


@pytest.mark.parametrize("seed", range(200))
def test_worst_window_equals_a_naive_scan(seed: int) -> None:
    rng = np.random.default_rng(seed)
    window = int(rng.integers(1, 30))
    earlier = rng.exponential(0.5, size=int(rng.integers(0, 40))).tolist()
    losses = rng.exponential(0.5, size=int(rng.integers(0, 60))).tolist()
    if seed % 4 == 0 and losses:  # a burst somewhere: the worst window is inside the batch
        at = int(rng.integers(0, len(losses)))
        losses[at : at + window] = [5.0] * len(losses[at : at + window])
    got = worst_window(np.array(earlier), np.array(losses), window)
    means = naive_windows(earlier, losses, window)
    if not means:
        assert got is None
    else:
        assert got is not None
        assert got.loss == pytest.approx(max(means.values()), rel=1e-12, abs=1e-12)
        assert means[got.end] == pytest.approx(got.loss, rel=1e-12, abs=1e-12)


def test_worst_window_sees_a_burst_the_last_window_hides() -> None:
    # A bad burst in the middle of a batch, clean events after it: the last window looks clean
    losses = np.array([0.1] * 100 + [3.0] * 10 + [0.1] * 100)
    assert worst_window(np.empty(0), losses, 10) == Window(pytest.approx(3.0), 109)
    # A window straddling the previous commit: its first events come from ``earlier``
    assert worst_window(np.array([9.0, 9.0, 9.0]), np.array([0.0]), 3) == Window(6.0, 0)
    # Too few events since the window restarted: no window is full, nothing to judge
    assert worst_window(np.array([1.0]), np.array([1.0]), 3) is None
    assert worst_window(np.array([1.0, 1.0]), np.empty(0), 2) is None


def test_advance_reports_the_worst_window_across_commits() -> None:
    # Given a guarded state whose window holds clean events
    cap, window = 8, 4
    state = EvalState(cap, ring=np.zeros((cap, COLUMNS)))
    for losses in ([0.1] * 6, [0.1, 0.1, 4.0, 4.0, 4.0, 0.1, 0.1, 0.1, 0.1, 0.1]):
        n = len(losses)
        update = advance(state, np.full((n, 1), 0.5), np.ones((n, 1)), np.array(losses), ["a"] * n, window)
        state = update.state
    # Then the worst window (0.1, 4, 4, 4 ending at the batch's 5th event) is reported, though the
    # batch's last window (all 0.1) and the window's reference figure look clean
    assert update.worst == Window(pytest.approx((0.1 + 12.0) / 4), 4)
    assert update.guard_loss == pytest.approx(np.mean([0.1, 4.0, 4.0, 4.0, 0.1, 0.1, 0.1, 0.1]))


def test_actions_beyond_the_limit_count_as_other() -> None:
    state = EvalState(10)
    names = [f"a{i}" for i in range(MAX_ACTIONS + 3)]
    n = len(names)
    update = advance(state, np.full((n, 1), 0.5), np.ones((n, 1)), np.ones(n), names, 0)
    assert len(update.state.actions) == MAX_ACTIONS + 1
    assert update.state.actions[-1] == OTHER_ACTION
    assert update.state.by_action[OTHER_ACTION][0] == 3
    # Decoding the committed JSON gives the same state
    again = decode_state(update.json, b"%d" % n, b"10", None, 999)
    assert (again.cap, again.wn, again.actions, again.total) == (
        10,
        n,
        update.state.actions,
        update.state.total,
    )
    assert again.ring is None


def test_report_of_a_view_counts_in_loss_not_in_accuracy() -> None:
    state = EvalState(4)
    P = np.array([[0.9], [0.3], [0.6]])
    Y = np.array([[1.0], [0.0], [0.5]])
    update = advance(state, P, Y, np.array([0.1, 0.4, 0.7]), ["click", "skip", "view"], 0)
    ring = b"".join(data for _, data in update.segments)
    report = eval_report(update.json, b"3", b"4", ring, outputs=1)
    assert report is not None
    assert report["count"] == 3
    assert report["logloss"] == pytest.approx(0.4)
    assert report["mse"] == pytest.approx((0.01 + 0.09 + 0.01) / 3)
    assert report["accuracy"] == 1.0  # two binary targets, both right; the view is not counted
    assert report["auc"] == 1.0
    assert report["by_action"]["view"]["accuracy"] is None
    empty = eval_report(None, None, None, None, 1)
    assert (empty["window"], empty["count"], empty["logloss"], empty["total"]["count"]) == (None, 0, None, 0)


def test_guard_rule_and_parsing() -> None:
    guard = parse_guard(Guard(100, 2.0).encode())
    assert guard == Guard(100, 2.0)
    assert parse_guard(None) is None
    ref = parse_reference(b"0.25 7")
    assert ref == Reference(0.25, 7)
    assert tripped(guard, 0.51, ref)
    assert not tripped(guard, 0.5, ref)
    assert not tripped(None, 9.0, ref)
    with pytest.raises(ConfigurationError, match="ratio"):
        Guard(10, float("nan"))
