"""Reading a sentinel's failover flag (``producer.sentinel_discovery.failing_over``), as redis-py
parses ``SENTINEL MASTERS`` over RESP2 (a string) and RESP3 (a set)."""

from __future__ import annotations

import pytest

from producer.sentinel_discovery import failing_over


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ("master", False),
        ("master,failover_in_progress", True),
        ("master,failover_in_progress,promoted", True),
        ({"master"}, False),
        ({"master", "failover_in_progress"}, True),
        ("", False),
    ],
)
def test_failing_over_reads_the_flag_in_either_protocol(flags: object, expected: bool) -> None:
    assert failing_over({"flags": flags}) is expected


def test_a_state_without_flags_is_not_failing_over() -> None:
    assert failing_over({}) is False
