"""The guard against a real Redis: flipped labels trip it; the batch is refused, the model rolls
back to the best recent snapshot (its predictions exactly), training pauses with events
dead-lettered as ``GuardTrippedError``, and ``resume`` trains again without re-tripping on the
old losses. Also through the command line (``itrain guard``, ``itrain resume``, stats ``--json``)."""

from __future__ import annotations

from typing import Any

import pytest

from producer.errors import ConfigurationError, GuardTrippedError, ModelNotInitialisedError
from producer.events import InteractionData
from producer.stats import read_stats
from tests.helpers import predictions, raw_event
from tests.integration.test_cli import cli, one_line, stats_json
from tests.integration.test_run_messages import app, batch_message, dead_letters, new_id, own_runtime, step
from worker.consume.runtime import run_messages
from worker.engine.guard import Guard
from worker.store.guard import resume, set_guard
from worker.store.snapshots import list_snapshots, take_snapshot

__all__ = ["app", "cli", "own_runtime"]  # fixtures, imported for the tests below

WINDOW, RATIO = 20, 3.0
PROBES = [
    InteractionData(user_id=f"p{i}", action_type=a, timestamp=i * 977)
    for i, a in enumerate(["click", "skip"] * 3)
]


def labelled(model: str, tag: str, n: int, *, flipped: bool = False) -> list[dict[str, Any]]:
    """Clicks labelled 1 and skips labelled 0 (the other way round when ``flipped``)."""
    out = []
    for i in range(n):
        action = "click" if i % 2 else "skip"
        label = float((action == "click") != flipped)
        out.append(
            raw_event(
                model,
                f"{tag}{i}",
                action_type=action,
                label=label,
                user_id=f"u{i % 5}",
                timestamp=1_700_000_000 + 977 * i,
            )
        )
    return out


def send(events: list[dict[str, Any]]) -> list[str]:
    """The events as one chunk message, run by the pool-process code; their result ids."""
    ids = [new_id() for _ in events]
    run_messages([batch_message(ids, events)])
    return ids


def outcome(app: Any, task_id: str) -> str:
    try:
        return app.AsyncResult(task_id).get(timeout=5)["status"]
    except GuardTrippedError:
        return "GuardTrippedError"


def test_flipped_labels_trip_the_guard_and_restore_the_snapshot(
    own_runtime, make_model, redis_client, app
) -> None:
    trainer = own_runtime.trainer
    # Given a guarded model that learned clicks -> 1, skips -> 0, and a snapshot of it
    model = make_model(lr=0.5)
    set_guard(redis_client, model, Guard(WINDOW, RATIO), own_runtime.settings)
    for k in range(6):
        send(labelled(model, f"good{k}-", 20))
    snap = take_snapshot(redis_client, model, keep=10)
    good = predictions(trainer, model, PROBES)
    guard = read_stats(redis_client, model)["eval"]["guard"]
    assert (guard["reference_version"], guard["trips"], guard["paused"]) == (snap, 0, False)
    (listed,) = list_snapshots(redis_client, model)
    assert listed.eval is not None
    assert listed.eval["count"] == 120  # the listing shows the evaluation window of that moment
    version_before, step_before = read_stats(redis_client, model)["version"], step(redis_client, model)
    # ... trained a little further on good labels after the snapshot
    send(labelled(model, "late-", 4))
    assert predictions(trainer, model, PROBES) != good

    # When flipped labels arrive, five at a time, until the guard trips
    refused: list[str] = []
    for k in range(20):
        ids = send(labelled(model, f"bad{k}-", 5, flipped=True))
        statuses = [outcome(app, i) for i in ids]
        if "GuardTrippedError" in statuses:
            assert set(statuses) == {"GuardTrippedError"}, statuses  # the whole batch is refused
            refused = ids
            break
    assert refused, "the guard never tripped on flipped labels"

    # Then the weights are the snapshot's, as a new version, and training is paused
    stats = read_stats(redis_client, model)
    assert predictions(trainer, model, PROBES) == good
    assert stats["version"] > version_before
    assert stats["eval"]["guard"]["paused"] is True
    assert stats["eval"]["guard"]["trips"] == 1
    # The window restarted with the rollback: nothing in it yet
    assert stats["eval"]["count"] == 0
    # The refused events are dead letters naming the guard; they have no marker (never trained)
    dead = [d for d in dead_letters(redis_client, model) if d["error"] == "GuardTrippedError"]
    assert {d["task_id"] for d in dead} >= set(refused)
    assert model in dead[0]["reason"]
    # Events sent while paused fail too, and train nothing
    step_paused = step(redis_client, model)
    (paused_id,) = send(labelled(model, "while-paused-", 1))
    with pytest.raises(GuardTrippedError, match="paused"):
        app.AsyncResult(paused_id).get(timeout=5)
    assert step(redis_client, model) == step_paused >= step_before

    # When the model is resumed, a refused event sent again trains, and good events do not re-trip
    assert resume(redis_client, model, own_runtime.settings) is True
    again = send(labelled(model, "bad0-", 1, flipped=True))
    assert outcome(app, again[0]) == "trained"
    for k in range(3):
        assert {outcome(app, i) for i in send(labelled(model, f"after{k}-", 10))} == {"trained"}
    assert read_stats(redis_client, model)["eval"]["guard"]["paused"] is False


def test_guard_without_a_reference_does_not_trip(own_runtime, make_model, redis_client, app) -> None:
    # A guard arms only at a snapshot taken with its window full: without one, nothing trips
    model = make_model(lr=0.5)
    set_guard(redis_client, model, Guard(WINDOW, RATIO), own_runtime.settings)
    send(labelled(model, "good-", 40))
    ids = send(labelled(model, "bad-", 40, flipped=True))
    assert {outcome(app, i) for i in ids} == {"trained"}
    assert read_stats(redis_client, model)["eval"]["guard"]["reference_loss"] is None


def test_guard_refuses_bad_settings_and_unknown_models(own_runtime, redis_client) -> None:
    with pytest.raises(ConfigurationError, match="ratio"):
        Guard(10, 0.5)
    with pytest.raises(ConfigurationError, match="window"):
        Guard(0, 2.0)
    with pytest.raises(ModelNotInitialisedError, match="nope"):
        set_guard(redis_client, "nope", Guard(10, 2.0), own_runtime.settings)
    with pytest.raises(ModelNotInitialisedError, match="nope"):
        resume(redis_client, "nope", own_runtime.settings)


def test_guard_and_resume_from_the_command_line(cli, capsys, redis_client, make_model) -> None:
    model = f"g-{new_id()[:8]}"
    assert cli(["init", "--model", model, "--guard-window", "30", "--guard-ratio", "2"]) == 0
    stats = stats_json(cli, capsys, model)
    assert (stats["eval"]["guard"]["window"], stats["eval"]["guard"]["ratio"]) == (30, 2.0)
    assert (stats["eval"]["window"], stats["eval"]["count"], stats["eval"]["logloss"]) == (1000, 0, None)
    assert cli(["guard", "--model", model, "--window", "50", "--ratio", "1.5"]) == 0
    assert stats_json(cli, capsys, model)["eval"]["guard"]["window"] == 50
    capsys.readouterr()
    assert cli(["guard", "--model", model, "--window", "50", "--ratio", "0.5"]) == 1
    assert "ratio" in one_line(capsys.readouterr().err)
    assert cli(["init", "--model", f"{model}x", "--guard-window", "30"]) == 1
    assert "--guard-ratio" in one_line(capsys.readouterr().err)
    assert cli(["resume", "--model", model]) == 0
    assert "was not paused" in capsys.readouterr().out
    assert cli(["guard", "--model", model, "--off"]) == 0
    assert stats_json(cli, capsys, model)["eval"]["guard"]["window"] is None
