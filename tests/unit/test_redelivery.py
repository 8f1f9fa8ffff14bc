"""The redelivery policy (``worker.consume.redelivery``): what counts, what is too old, the back-off."""

from __future__ import annotations

import pytest
import redis.exceptions as rex
from billiard.exceptions import WorkerLostError

from producer.errors import DeliveryExpiredError, DeliveryLimitError
from producer.settings import Settings
from worker.consume.redelivery import Backoff, JobAction, after_job_failure, first_taken, refusal


def test_first_taken_reads_only_a_positive_float() -> None:
    assert first_taken({"first_taken": 1_765_000_000.5}) == 1_765_000_000.5
    for hostile in ("1765000000", 17, True, -1.0, 0.0, None, [1.0]):
        assert first_taken({"first_taken": hostile}) is None
    assert first_taken({}) is None


def test_refusal_by_count_then_by_age() -> None:
    s = Settings(dedupe_ttl=100, visibility_timeout=20, max_deliveries=2)
    assert s.expire_after == 80
    now = 1_000_000.0
    assert refusal(2, now - 79, s, now) is None
    assert refusal(1, None, s, now) is None  # a transport that does not say: no age rule
    late = refusal(3, now, s, now)
    assert type(late) is DeliveryLimitError
    assert "delivered 3 times" in str(late)
    old = refusal(1, now - 81, s, now)
    assert isinstance(old, DeliveryExpiredError)
    assert isinstance(old, DeliveryLimitError)
    assert "81 s ago" in str(old)
    assert "100 - 20 = 80 s" in str(old)


def test_backoff_doubles_up_to_its_ceiling_and_resets() -> None:
    b = Backoff(ceiling=3.0)
    assert [b.next_delay() for _ in range(5)] == [0.5, 1.0, 2.0, 3.0, 3.0]
    b.reset()
    assert b.next_delay() == 0.5
    many = Backoff(ceiling=30.0)
    assert max(many.next_delay() for _ in range(2000)) == 30.0  # no overflow after a long fault


def test_requeue_ceiling_is_the_setting_within_half_the_visibility_timeout() -> None:
    assert Settings().requeue_ceiling == 30.0
    assert Settings(requeue_backoff_max=2).requeue_ceiling == 2.0
    assert Settings(visibility_timeout=8, dedupe_ttl=600).requeue_ceiling == 4.0
    with pytest.raises(ValueError, match="requeue_backoff_max"):
        Settings(requeue_backoff_max=0)


@pytest.mark.parametrize(
    ("exc", "alone", "action"),
    [
        (rex.ReadOnlyError("You can't write against a read only replica."), False, JobAction.REQUEUE),
        (rex.ResponseError("MISCONF Redis is configured to save RDB snapshots"), True, JobAction.REQUEUE),
        (ConnectionResetError(104, "reset"), True, JobAction.REQUEUE),
        (WorkerLostError("signal 9"), False, JobAction.SPLIT),
        (WorkerLostError("signal 9"), True, JobAction.DEAD_LETTER),
        (ValueError("a bug"), True, JobAction.DEAD_LETTER),
    ],
)
def test_after_job_failure(exc: BaseException, alone: bool, action: JobAction) -> None:
    assert after_job_failure(exc, alone=alone) is action
