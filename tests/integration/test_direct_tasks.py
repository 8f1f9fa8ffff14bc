"""A direct call of a training task (``train_step.apply()``, eager mode) raises the class of the
error that failed it, as its result and dead letter name it, not a guess from its text."""

from __future__ import annotations

import pytest

from producer.errors import GuardTrippedError, InvalidEventError
from producer.keys import ModelKeys
from tests.helpers import raw_event
from tests.integration.test_run_messages import dead_letters, new_id, own_runtime, step
from worker.consume.tasks import train_batch, train_step

__all__ = ["own_runtime"]  # a fixture, imported for the tests below


def test_a_direct_call_on_a_paused_model_raises_guard_tripped_error(
    own_runtime, make_model, redis_client
) -> None:
    # Given a paused model (as its guard pauses it when it trips)
    model = make_model()
    redis_client.hset(ModelKeys(model).ckpt, "paused", "1")

    # When an event is trained by a direct call of the task
    with pytest.raises(GuardTrippedError, match="paused") as info:
        train_step.apply(args=[raw_event(model, "while-paused")], throw=True)

    # Then the error is the one its dead letter names, and nothing trained
    assert not isinstance(info.value, InvalidEventError)
    assert dead_letters(redis_client, model)[-1]["error"] == "GuardTrippedError"
    assert step(redis_client, model) == 0


def test_a_direct_call_with_an_invalid_event_raises_invalid_event_error(own_runtime, make_model) -> None:
    model = make_model()
    with pytest.raises(InvalidEventError, match="timestamp"):
        train_step.apply(args=[raw_event(model, new_id(), timestamp="not a time")], throw=True)
    # A batch answers per event: its call succeeds with the counts
    ids = [new_id(), new_id()]
    events = [raw_event(model, ids[0]), raw_event(model, ids[1], timestamp="not a time")]
    counts = train_batch.apply(args=[ids, events], throw=True).get()
    assert counts == {"events": 2, "trained": 1, "failed": 1}
