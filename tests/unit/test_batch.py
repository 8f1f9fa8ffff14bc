"""The engine's phases over one ``BatchPlan`` (``worker.engine.batch``), without Redis: what
``plan`` decides for each job, what ``step`` trains, how ``settle_copies`` answers in-batch
copies, and which history entries are built."""

from __future__ import annotations

import numpy as np
import orjson

from producer.events import InteractionData
from producer.settings import DEFAULT_TARGETS
from tests.helpers import make_events
from worker.engine.batch import BatchPlan, Job, history, plan, prepare, settle_copies, step
from worker.engine.checkpoint import Checkpoint, ModelConfig
from worker.engine.mlp import PerEventSGD, minibatch_step
from worker.engine.targets import make_target


def _batch(events: list[dict], done: list[bool] | None = None, step0: int = 0, **config: object) -> BatchPlan:
    jobs = [Job(f"task-{i}", InteractionData.model_validate(e)) for i, e in enumerate(events)]
    base = Checkpoint.initial(ModelConfig.model_validate(config))
    base.step = step0
    prep = prepare(jobs, base.config.outputs, DEFAULT_TARGETS)
    return plan("m", prep, base, done or [False] * len(jobs), DEFAULT_TARGETS)


def test_initial_checkpoint_is_seeded_and_untrained() -> None:
    a = Checkpoint.initial(ModelConfig(hidden=5, seed=3))
    b = Checkpoint.initial(ModelConfig(hidden=5, seed=3))
    c = Checkpoint.initial(ModelConfig(hidden=5, seed=4))
    assert (a.version, a.step, a.loss_ema, a.loss_last) == (0, 0, None, None)
    assert a.theta.shape == (a.config.shape.size,)
    np.testing.assert_array_equal(a.theta, b.theta)
    assert not np.array_equal(a.theta, c.theta)


def test_plan_sorts_done_refused_copies_and_trainable() -> None:
    # Given: an event already trained, one without a target, one fresh and a copy of it
    events = make_events("m", 3, "p")
    events[1]["action_type"] = "hover"  # no default target, no label
    events.append(dict(events[2]))
    # When planned with the first event marked done
    batch = _batch(events, done=[True, False, False, False])
    # Then
    assert batch.outcomes[0] is not None
    assert batch.outcomes[0].result["status"] == "duplicate"
    assert batch.outcomes[1] is not None
    assert batch.outcomes[1].status == "FAILURE"
    assert batch.outcomes[1].event_id == "p-1"
    assert batch.train == [2]
    assert batch.copies == [(3, 2)]
    assert len(batch.dead) == 1
    assert orjson.loads(batch.dead[0])["event_id"] == "p-1"
    # And once trained, the copy is a duplicate of its first copy
    step(batch)
    settle_copies(batch)
    assert [i for i, _ in batch.trained] == [2]
    assert batch.outcomes[3] is not None
    assert batch.outcomes[3].result["status"] == "duplicate"
    assert batch.outcomes[2] is None  # answered by the commit


def test_copy_of_a_refused_event_is_refused_like_it() -> None:
    # Given a model whose every step overflows, and an event sent twice in one batch
    events = make_events("m", 1, "nf")
    batch = _batch([events[0], dict(events[0])], lr=1e308, clip=0)
    # When stepped and settled
    step(batch)
    settle_copies(batch)
    # Then both copies fail with the same error, each with its dead letter, and nothing trained
    assert batch.trained == []
    first, copy = batch.outcomes
    assert first is not None
    assert copy is not None
    assert (first.status, copy.status) == ("FAILURE", "FAILURE")
    assert copy.result == first.result
    assert (first.event_id, copy.event_id) == ("nf-0", "nf-0")
    assert [orjson.loads(d)["task_id"] for d in batch.dead] == ["task-0", "task-1"]
    np.testing.assert_array_equal(batch.theta, batch.base.theta)


def test_step_per_event_is_exact_sequential_sgd_and_leaves_the_cache_alone() -> None:
    events = make_events("m", 30, "seq", labels=True)
    batch = _batch(events, hidden=6, lr=0.2, seed=2)
    before = batch.base.theta.copy()
    step(batch)
    cfg = batch.base.config
    theta = Checkpoint.initial(cfg).theta
    kernel = PerEventSGD(cfg.shape, cfg.lr, cfg.clip, theta)
    losses = [
        kernel.step(x, make_target(j.event, 1, DEFAULT_TARGETS).tolist())
        for x, j in zip(batch.X, batch.jobs, strict=True)
    ]
    # The compiled kernel sums in its own order: equal to the numpy reference within 1e-12.
    np.testing.assert_allclose(batch.theta, theta, rtol=0, atol=1e-12)
    np.testing.assert_allclose([loss for _, loss in batch.trained], losses, rtol=0, atol=1e-12)
    assert not np.array_equal(batch.theta, before)
    np.testing.assert_array_equal(batch.base.theta, before)  # the cached checkpoint is untouched


def test_step_minibatch_is_one_vectorised_step() -> None:
    events = make_events("m", 20, "mb", labels=True)
    batch = _batch(events, mode="minibatch", hidden=5, lr=0.1, seed=7)
    step(batch)
    cfg = batch.base.config
    T = np.stack([make_target(j.event, 1, DEFAULT_TARGETS) for j in batch.jobs])
    theta, losses = minibatch_step(Checkpoint.initial(cfg).theta, cfg.shape, batch.X, T, cfg.lr, cfg.clip)
    np.testing.assert_array_equal(batch.theta, theta)
    assert [loss for _, loss in batch.trained] == losses.tolist()


def test_history_holds_only_the_last_history_max_trained_events() -> None:
    # Given 7 events trained on a checkpoint at step 10
    events = make_events("m", 7, "h")
    batch = _batch(events, step0=10)
    step(batch)
    # When the history is built with room for 3
    entries = [orjson.loads(e) for e in history(batch, 3, now=123.0)]
    # Then exactly the last three, with the steps the commit gives them (11..17), oldest first
    assert [e["step"] for e in entries] == [15, 16, 17]
    assert [e["event_id"] for e in entries] == ["h-4", "h-5", "h-6"]
    assert [e["loss"] for e in entries] == [loss for _, loss in batch.trained[-3:]]
    assert all(e["trained_at"] == 123.0 for e in entries)
    assert all("user_id" not in e for e in entries)
    assert entries[0]["features"] == batch.X[4].tolist()
    # And with room for all, every trained event
    assert [orjson.loads(e)["step"] for e in history(batch, 1000, now=0.0)] == list(range(11, 18))


def test_prepare_made_for_another_output_count_is_made_again_under_the_lock() -> None:
    # Given jobs prepared for a 1-output model, of a model that has 3 outputs
    events = make_events("m", 4, "out", labels=False)
    jobs = [Job(f"task-{i}", InteractionData.model_validate(e)) for i, e in enumerate(events)]
    base = Checkpoint.initial(ModelConfig(outputs=3))
    prep = prepare(jobs, 1, DEFAULT_TARGETS)
    # When planned and stepped
    batch = plan("m", prep, base, [False] * 4, DEFAULT_TARGETS)
    step(batch)
    # Then the targets are the model's shape, as if prepared for it
    assert batch.prep.Y.shape == (4, 3)
    np.testing.assert_array_equal(batch.prep.Y, prepare(jobs, 3, DEFAULT_TARGETS).Y)
    assert len(batch.trained) == 4


def test_prepare_finds_in_batch_copies_and_history_parts() -> None:
    # Given an event sent three times among others
    events = make_events("m", 3, "cp")
    events += [dict(events[1]), dict(events[1])]
    jobs = [Job(f"task-{i}", InteractionData.model_validate(e)) for i, e in enumerate(events)]
    # When prepared
    prep = prepare(jobs, 1, DEFAULT_TARGETS)
    # Then each later copy names its first one, and each history part is a JSON object's inside
    assert prep.copies == [(3, 1), (4, 1)]
    part = orjson.loads(b"{" + prep.history_parts[0] + b"}")
    assert part["event_id"] == "cp-0"
    assert part["features"] == prep.X[0].tolist()
    assert part["target"] == prep.Y[0].tolist()
