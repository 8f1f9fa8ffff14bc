"""Fire-and-forget (Celery's ``ignore_result``) against a real worker: ``train_step(...,
result=False)`` and ``train_many(..., result=False)`` train, dead-letter failures and send task
events (Flower), and write no ``celery-task-meta-*`` key; their handles behave as Celery's
``AsyncResult`` of an ignored task, and ``wait_all`` refuses them at once."""

from __future__ import annotations

import time
import uuid

import pytest
import redis

from producer.client import TrainingClient
from producer.errors import ResultIgnoredError
from producer.protocol import result_key
from tests.helpers import make_event, make_events, wait_until
from tests.integration.test_run_messages import dead_letters, step
from tests.integration.test_task_events import _Receiver

WAIT = 60.0


def test_fire_and_forget_trains_dead_letters_and_writes_no_result(
    start_workers, make_model, client: TrainingClient, redis_client: redis.Redis, redis_url: str
) -> None:
    # Given a worker, a model, and a listener for task events (what Flower runs)
    model = make_model()
    (proc,) = start_workers(1)
    tag = f"ff-{uuid.uuid4().hex[:6]}"
    receiver = _Receiver(redis_url)
    try:
        # When events are sent fire-and-forget, one event of each kind without a target
        steps = [client.train_step(e, result=False) for e in make_events(model, 5, tag)]
        bad_step = client.train_step(make_event(model, 5, tag, action_type="teleport"), result=False)
        chunk = [*make_events(model, 40, tag, start=6), make_event(model, 46, tag, action_type="teleport")]
        many = client.train_many(chunk, result=False)
        silent = [*steps, bad_step, *many]

        # Then each handle is Celery's handle of an ignored result: get() is None at once,
        # the state PENDING, not ready
        for h in silent:
            assert h.ignored is True
            assert h.get(timeout=0.01) is None
            assert h.state == "PENDING"
            assert h.ready() is False
        # and wait_all refuses them at once, naming result=False, instead of waiting forever
        started = time.monotonic()
        with pytest.raises(ResultIgnoredError, match=r"result=False"):
            client.wait_all(silent, timeout=WAIT)
        with pytest.raises(ResultIgnoredError, match=r"at index 1\).*result=False"):
            client.wait_all([client.train_step(make_event(model, 47, tag)), many[0]], timeout=WAIT)
        assert time.monotonic() - started < WAIT / 2

        # And the valid events train (45 silent and 1 ordinary), both failures are dead-lettered
        wait_until(lambda: step(redis_client, model) == 46, WAIT, "46 events trained")
        wait_until(
            lambda: (
                sorted(d["event_id"] for d in dead_letters(redis_client, model)) == [f"{tag}-46", f"{tag}-5"]
            ),
            WAIT,
            "two dead letters",
        )
        # (an ordinary event after them: once its result is in, their jobs have ended)
        last = client.train_step(make_event(model, 48, tag))
        assert last.get(timeout=WAIT)["status"] == "trained"
        assert redis_client.exists(result_key(last.id)) == 1
        # and not one result key was written for them
        assert [h.id for h in silent if redis_client.exists(h.key)] == []

        # And Flower's event stream still shows each train_step: received, then its end
        wait_until(
            lambda: all(len(receiver.seen.get(h.id, [])) >= 2 for h in [*steps, bad_step]),
            30,
            "task events of the fire-and-forget tasks",
        )
        assert {tuple(receiver.seen[h.id]) for h in steps} == {("task-received", "task-succeeded")}
        assert receiver.seen[bad_step.id] == ["task-received", "task-failed"]
        assert proc.poll() is None
    finally:
        receiver.close()
