"""Unit tests of preprocessing: the spec's four input features (``worker.engine.features``)."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone

import numpy as np
import pytest

from tests.helpers import make_interaction
from worker.engine.features import (
    N_FEATURES,
    action_hash,
    featurize,
    featurize_many,
    time_of_day,
    unit_hash,
    user_hash,
)

TEXTS = [f"text-{i}" for i in range(2000)] + ["", "click", "view", "ü-ñ-中文", "x" * 256]


# -- hashes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("fn", [action_hash, user_hash], ids=["action", "user"])
def test_hashes_lie_in_minus_one_one(fn) -> None:
    """Both hashes map any text into [-1, 1]."""
    # Given many different texts
    # When each is hashed
    values = np.array([fn(t) for t in TEXTS])
    # Then every value is in [-1, 1] and the range is actually used
    assert np.all(values >= -1.0)
    assert np.all(values <= 1.0)
    assert values.min() < -0.9
    assert values.max() > 0.9


@pytest.mark.parametrize("fn", [action_hash, user_hash], ids=["action", "user"])
def test_hashes_distinguish_texts(fn) -> None:
    """Different texts get different hash values (no collisions among a few thousand)."""
    # Given many different texts
    # When each is hashed
    values = {fn(t) for t in TEXTS}
    # Then they are all distinct
    assert len(values) == len(TEXTS)


def test_action_and_user_hashes_are_separate_functions() -> None:
    """The same text hashes differently as an action and as a user (personalised blake2b)."""
    # Given one text used as both an action type and a user id
    text = "click"
    # When hashed both ways
    a, u = action_hash(text), user_hash(text)
    # Then the two features differ
    assert a != u
    assert a == unit_hash(text, b"itrain-action")
    assert u == unit_hash(text, b"itrain-user")


def _hashes_in_subprocess(seed: str) -> dict[str, object]:
    code = (
        "import json; from worker.engine.features import action_hash, user_hash; "
        "print(json.dumps({'action': [action_hash(t) for t in ('click', 'view', 'purchase')], "
        "'user': [user_hash(t) for t in ('u1', 'u2', 'alice@example.com')], "
        "'builtin': hash('click')}))"
    )
    env = {**os.environ, "PYTHONHASHSEED": seed}
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60, check=True
    )
    result: dict[str, object] = json.loads(proc.stdout)
    return result


def test_hashes_are_stable_across_processes_and_hash_seeds() -> None:
    """Two processes with different PYTHONHASHSEED values compute the same features."""
    # Given two separate Python processes with different hash seeds
    # When each computes the same action and user hashes
    first = _hashes_in_subprocess("1")
    second = _hashes_in_subprocess("2")
    # Then the seeds did change Python's own hash() (the test can tell the difference)
    assert first["builtin"] != second["builtin"]
    # And the feature hashes are identical, in both processes and in this one
    assert first["action"] == second["action"]
    assert first["user"] == second["user"]
    assert first["action"] == [action_hash(t) for t in ("click", "view", "purchase")]
    assert first["user"] == [user_hash(t) for t in ("u1", "u2", "alice@example.com")]


# -- time of day ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hms", "expected"),
    [
        ((0, 0, 0, 0), 0.0),
        ((6, 0, 0, 0), 0.25),
        ((12, 0, 0, 0), 0.5),
        ((18, 0, 0, 0), 0.75),
        ((0, 0, 1, 0), 1 / 86400),
    ],
)
def test_time_of_day_exact_values(hms, expected) -> None:
    """Known UTC times map to exact fractions of the day."""
    # Given an event at a known UTC time
    h, m, s, us = hms
    ev = make_interaction(timestamp=datetime(2024, 5, 17, h, m, s, us, tzinfo=UTC))
    # When featurised
    x = featurize(ev)
    # Then the time-of-day feature is that fraction
    assert x[1] == pytest.approx(expected, abs=1e-15)
    assert time_of_day(ev.timestamp) == pytest.approx(expected, abs=1e-15)


def test_time_of_day_last_microsecond_is_below_one() -> None:
    """23:59:59.999999 is the largest value and still < 1."""
    # Given the last microsecond of a day
    ev = make_interaction(timestamp=datetime(2024, 5, 17, 23, 59, 59, 999_999, tzinfo=UTC))
    # When featurised
    x = featurize(ev)
    # Then the feature is just below 1
    assert 0.99999 < x[1] < 1.0


def test_time_of_day_of_naive_datetime_is_utc() -> None:
    """A naive datetime is read as UTC, not as the host's local time."""
    # Given a naive datetime at noon
    ev = make_interaction(timestamp=datetime(2024, 5, 17, 12, 0, 0))
    # When featurised
    x = featurize(ev)
    # Then noon UTC is 0.5
    assert x[1] == 0.5


@pytest.mark.parametrize(("offset_hours", "local_hour"), [(2, 14), (-5, 7), (9, 21)])
def test_time_of_day_of_aware_non_utc_is_converted(offset_hours, local_hour) -> None:
    """An aware non-UTC datetime is converted to UTC before taking the time of day."""
    # Given noon UTC expressed in another time zone
    tz = timezone(timedelta(hours=offset_hours))
    ev = make_interaction(timestamp=datetime(2024, 5, 17, local_hour, 0, 0, tzinfo=tz))
    # When featurised
    x = featurize(ev)
    # Then it is noon UTC
    assert x[1] == 0.5


@pytest.mark.parametrize("value", [43200, 43200.0, 86400 * 19000 + 43200, "2024-05-17T12:00:00Z"])
def test_time_of_day_from_epoch_seconds_and_iso(value) -> None:
    """Epoch seconds and ISO strings give the same UTC time of day."""
    # Given a noon-UTC timestamp in another input form
    ev = make_interaction(timestamp=value)
    # When featurised
    x = featurize(ev)
    # Then the time-of-day feature is 0.5
    assert x[1] == 0.5


def test_time_of_day_in_range_over_a_day() -> None:
    """Every second of a day maps into [0, 1), increasing."""
    # Given timestamps across one whole day, every 7 seconds
    start = datetime(2024, 1, 1, tzinfo=UTC)
    values = [time_of_day(start + timedelta(seconds=s)) for s in range(0, 86400, 7)]
    # Then all are in [0, 1) and strictly increasing
    assert all(0.0 <= v < 1.0 for v in values)
    assert all(a < b for a, b in itertools.pairwise(values))


# -- context indicator ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("context", "expected"),
    [
        (None, 0.0),
        ({}, 0.0),
        ({"page": "home"}, 1.0),
        ({"flag": False}, 1.0),
        ({"n": 0}, 1.0),
        ({"empty": ""}, 1.0),
    ],
)
def test_context_indicator(context, expected) -> None:
    """1.0 when the context has entries (whatever their values), else 0.0."""
    # Given an event with this context
    ev = make_interaction(context=context)
    # When featurised
    x = featurize(ev)
    # Then the indicator is as expected
    assert x[3] == expected


# -- the feature vector ---------------------------------------------------------------------------


def test_featurize_layout() -> None:
    """The vector is float64 [action_hash, time_of_day, user_hash, context_indicator]."""
    # Given an event
    ev = make_interaction(user_id="alice", action_type="view", timestamp=21600, context={"k": 1})
    # When featurised
    x = featurize(ev)
    # Then the four features are in the spec's order
    assert x.dtype == np.float64
    assert x.shape == (N_FEATURES,) == (4,)
    assert x.tolist() == [action_hash("view"), 0.25, user_hash("alice"), 1.0]


def test_featurize_many_equals_row_by_row() -> None:
    """``featurize_many`` is ``featurize`` on each event, stacked in order."""
    # Given a varied list of events
    events = [
        make_interaction(
            user_id=f"user-{i % 7}",
            action_type=("click", "view", "purchase", "dismiss")[i % 4],
            timestamp=1_700_000_000 + 3733 * i,
            context={"i": i} if i % 3 else None,
        )
        for i in range(25)
    ]
    # When featurised at once and one by one
    X = featurize_many(events)
    rows = np.stack([featurize(e) for e in events])
    # Then the matrices are identical
    assert X.shape == (25, 4)
    assert X.dtype == np.float64
    np.testing.assert_array_equal(X, rows)


def test_featurize_many_of_nothing_is_empty_matrix() -> None:
    """No events give a (0, 4) matrix."""
    # When featurising an empty list
    X = featurize_many([])
    # Then the shape still has four columns
    assert X.shape == (0, 4)
