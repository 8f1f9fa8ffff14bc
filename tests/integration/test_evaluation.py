"""Online evaluation (test-then-train) against a real Redis: the metrics a model's stats show equal
a hand computation over the same stream, made with the numpy reference kernel, for the window
and since creation, per action; they move in the same commit as the weights."""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import pytest

from producer.events import InteractionData
from producer.settings import Settings
from producer.stats import read_stats
from tests.helpers import make_interaction, raw_event
from tests.integration.test_run_messages import batch_message, new_id
from worker.consume import runtime
from worker.consume.runtime import Runtime, run_messages
from worker.engine.batch import Job
from worker.engine.checkpoint import Checkpoint, ModelConfig
from worker.engine.features import featurize
from worker.engine.guard import Guard
from worker.engine.mlp import PerEventSGD, forward, sigmoid
from worker.engine.targets import make_target
from worker.store.guard import set_guard
from worker.store.model_store import Store
from worker.training.trainer import Trainer

WINDOW = 5


@pytest.fixture
def small_window(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Runtime:
    rt = Runtime(Settings(redis_url=redis_url, eval_window=WINDOW))
    monkeypatch.setattr(runtime, "_runtime", (os.getpid(), rt))
    return rt


def stream(model: str) -> list[dict[str, Any]]:
    """Twelve events: clicks (target 1), skips (0), views (0.5, out of accuracy and AUC) and a
    labelled event, over several users."""
    actions = [
        "click",
        "skip",
        "view",
        "click",
        "skip",
        "click",
        "view",
        "skip",
        "click",
        "skip",
        "click",
        "like",
    ]
    events = [
        raw_event(model, f"e{i}", user_id=f"u{i % 4}", action_type=a, timestamp=1_700_000_000 + 977 * i)
        for i, a in enumerate(actions)
    ]
    events[11]["label"] = 0.0  # a "like" labelled 0: the label wins over the action's target
    return events


def by_hand(
    events: list[dict[str, Any]], config: ModelConfig, settings: Settings
) -> list[tuple[str, float, float, float]]:
    """(action, loss, prediction, target) of each event, scored before its update: the numpy
    reference kernel, event by event."""
    ckpt = Checkpoint.initial(config)
    kernel = PerEventSGD(config.shape, config.lr, config.clip, ckpt.theta)
    out = []
    for raw in events:
        ev = InteractionData.model_validate(raw)
        x = featurize(ev)
        t = make_target(ev, 1, settings.targets).tolist()
        _, z = forward(ckpt.theta, config.shape, x[None, :])
        p = float(sigmoid(z)[0, 0])
        loss = kernel.step(x, t)
        out.append((ev.action_type, loss, p, t[0]))
    return out


def figures(rows: list[tuple[str, float, float, float]], with_auc: bool) -> dict[str, Any]:
    binary = [(p, t) for _, _, p, t in rows if t in (0.0, 1.0)]
    positives = [p for p, t in binary if t == 1.0]
    negatives = [p for p, t in binary if t == 0.0]
    auc = None
    if with_auc and positives and negatives:
        wins = sum((a > b) + 0.5 * (a == b) for a in positives for b in negatives)
        auc = wins / (len(positives) * len(negatives))
    return {
        "count": len(rows),
        "logloss": sum(r[1] for r in rows) / len(rows),
        "mse": sum((p - t) ** 2 for _, _, p, t in rows) / len(rows),
        "accuracy": sum((p >= 0.5) == (t == 1.0) for p, t in binary) / len(binary) if binary else None,
        "auc": auc,
    }


def close(got: dict[str, Any], want: dict[str, Any]) -> None:
    for key, value in want.items():
        if value is None or isinstance(value, int):
            assert got[key] == value, (key, got, want)
        else:
            assert got[key] == pytest.approx(value, abs=1e-12), (key, got, want)


def test_eval_matches_a_hand_computation(small_window, make_model, redis_client) -> None:
    # Given a model, and twelve events sent in chunks of 3, 4 and 5 (the window of 5 wraps)
    settings = small_window.settings
    model = make_model(lr=0.5)
    events = stream(model)
    for chunk in (events[:3], events[3:7], events[7:]):
        (summary,) = run_messages([batch_message([new_id() for _ in chunk], chunk)])
        assert summary[2]["trained"] == len(chunk), summary
    # When the stats are read
    ev = read_stats(redis_client, model)["eval"]
    # Then the window is the last five events and the total all twelve, as computed by hand
    rows = by_hand(events, ModelConfig(lr=0.5), settings)
    assert ev["window"] == WINDOW
    close({k: ev[k] for k in ("count", "logloss", "mse", "accuracy", "auc")}, figures(rows[-WINDOW:], True))
    close(ev["total"], {k: v for k, v in figures(rows, False).items() if k != "auc"})
    # And per action: each action's events of the window, and all of them
    assert set(ev["by_action"]) == {"click", "skip", "view", "like"}
    for action, got in ev["by_action"].items():
        mine = [r for r in rows if r[0] == action]
        recent = [r for r in rows[-WINDOW:] if r[0] == action]
        close(got["total"], {k: v for k, v in figures(mine, False).items() if k != "auc"})
        if recent:
            close({k: got[k] for k in ("count", "logloss", "mse", "accuracy", "auc")}, figures(recent, True))
        else:
            assert (got["count"], got["logloss"]) == (0, None)
    # A view (target 0.5) counts in log loss and squared error, never in accuracy
    assert ev["by_action"]["view"]["total"]["accuracy"] is None
    assert ev["by_action"]["view"]["total"]["count"] == 2


def test_eval_moves_with_the_weights_and_duplicates_do_not_count(
    small_window, make_model, redis_client
) -> None:
    model = make_model()
    events = [raw_event(model, f"d{i}", action_type="click") for i in range(3)]
    run_messages([batch_message([new_id() for _ in events], events)])
    before = read_stats(redis_client, model)
    # A re-sent batch answers duplicate: nothing trained, nothing scored
    run_messages([batch_message([new_id() for _ in events], events)])
    after = read_stats(redis_client, model)
    assert after["eval"] == before["eval"]
    assert after["version"] == before["version"]
    assert before["eval"]["total"]["count"] == before["step"] == 3
    assert math.isfinite(before["eval"]["logloss"])


def test_a_new_model_has_no_eval_and_multi_output_has_no_auc(small_window, make_model, redis_client) -> None:
    model = make_model(outputs=2)
    fresh = read_stats(redis_client, model)["eval"]
    assert (fresh["window"], fresh["count"], fresh["logloss"], fresh["by_action"]) == (None, 0, None, {})
    assert read_stats(redis_client, "no-such-model")["eval"] is None
    events = [raw_event(model, f"m{i}", label=[1.0, 0.0] if i % 2 else [0.0, 1.0]) for i in range(4)]
    run_messages([batch_message([new_id() for _ in events], events)])
    ev = read_stats(redis_client, model)["eval"]
    assert (ev["count"], ev["auc"]) == (4, None)
    # Accuracy counts each output whose target is 0 or 1: 8 of them here
    assert ev["accuracy"] * 8 == pytest.approx(round(ev["accuracy"] * 8))
    assert np.isfinite(ev["mse"])


@pytest.mark.parametrize("mode", ["per_event", "minibatch"])
def test_two_workers_alternating_keep_one_evaluation(mode, small_window, make_model, redis_client) -> None:
    """Two trainers (two workers' caches) take turns on one model: the evaluation each commits
    continues the other's, and equals the losses the results report (each event scored before
    its update), in both modes."""
    settings = small_window.settings
    model = make_model(lr=0.3, mode=mode)
    workers = [Trainer(Store(redis_client, settings), settings) for _ in range(2)]
    losses: list[tuple[int, float]] = []
    sizes = [3, 1, 4, 2, 7, 1, 1, 5]
    k = 0
    for turn, n in enumerate(sizes):
        jobs = [Job(f"t{k + i}", make_interaction(model=model, i=k + i, tag="alt")) for i in range(n)]
        k += n
        outcomes = workers[turn % 2].train(jobs)
        losses += [(o.result["step"], o.result["loss"]) for o in outcomes]
    ordered = [loss for _, loss in sorted(losses)]
    ev = read_stats(redis_client, model)["eval"]
    assert ev["total"]["count"] == len(ordered) == read_stats(redis_client, model)["step"]
    assert ev["total"]["logloss"] == pytest.approx(sum(ordered) / len(ordered), abs=1e-12)
    assert ev["count"] == WINDOW
    assert ev["logloss"] == pytest.approx(sum(ordered[-WINDOW:]) / WINDOW, abs=1e-12)


def test_a_guard_set_while_a_worker_holds_the_model_reaches_it(
    small_window, make_model, redis_client
) -> None:
    """A worker's cached checkpoint is refreshed when a guard is set (its id changes): the
    worker's next commit counts the window from the restart, not from its stale copy."""
    settings = small_window.settings
    model = make_model()
    worker = Trainer(Store(redis_client, settings), settings)
    worker.train([Job(f"a{i}", make_interaction(model=model, i=i, tag="a")) for i in range(4)])
    assert read_stats(redis_client, model)["eval"]["count"] == 4
    set_guard(redis_client, model, Guard(3, 2.0), settings)
    assert read_stats(redis_client, model)["eval"]["count"] == 0
    worker.train([Job(f"b{i}", make_interaction(model=model, i=i, tag="b")) for i in range(2)])
    ev = read_stats(redis_client, model)["eval"]
    assert (ev["count"], ev["total"]["count"], ev["guard"]["window"]) == (2, 6, 3)
