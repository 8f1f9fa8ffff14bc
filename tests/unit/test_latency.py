"""The latency histograms' maths: bucket counts and sums, as Prometheus reads them."""

from __future__ import annotations

import numpy as np
import pytest

from producer.keys import LATENCY_BUCKETS
from worker.engine.latency import histogram_fields


def test_values_fall_in_the_first_bucket_whose_bound_holds_them() -> None:
    # Given values on a bound, between bounds, beyond the last, and negative
    values = np.array([0.005, 0.006, 0.0, 1e9, -3.0, 0.005])
    # When they are counted
    fields = dict(histogram_fields("e", values))
    # Then a value equal to a bound is in that bound's bucket (le), a negative one counts as 0,
    # and the largest goes to +Inf (the index after the last bound)
    assert fields == {
        "e:0": 4,  # 0.005, 0.0, -3.0 (as 0), 0.005
        "e:1": 1,  # 0.006 <= 0.01
        f"e:{len(LATENCY_BUCKETS)}": 1,
        "e:sum": 0.005 + 0.006 + 1e9 + 0.005,
    }


def test_no_values_add_nothing() -> None:
    assert histogram_fields("f", np.array([])) == []


@pytest.mark.parametrize("n", [5, 64, 65, 10_000])  # by bisection, then with numpy
def test_counts_add_up_to_the_values(n: int) -> None:
    # Given values spread over the buckets
    rng = np.random.default_rng(7)
    values = rng.exponential(30.0, n)
    fields = histogram_fields("f", values)
    counts = {k: v for k, v in fields if not k.endswith(":sum")}
    # Then every value is counted once, and the sum is theirs
    assert sum(counts.values()) == n
    assert dict(fields)["f:sum"] == pytest.approx(np.sum(values), rel=1e-12)
    # And each bucket holds what a bisection of the bounds puts there
    expected = np.bincount(np.searchsorted(LATENCY_BUCKETS, values), minlength=len(LATENCY_BUCKETS) + 1)
    assert counts == {f"f:{i}": int(c) for i, c in enumerate(expected) if c}
