"""Snapshots and rollback against a real Redis: a rollback restores the predictions exactly, as a
new version; step keeps counting; undone events answer duplicate when re-sent."""

from __future__ import annotations

import pytest

from producer.errors import ModelError
from producer.events import InteractionData
from producer.keys import ModelKeys
from producer.settings import Settings
from tests.helpers import predictions, raw_event
from tests.integration.test_cli import cli, one_line
from tests.integration.test_run_messages import own_runtime, step_message
from worker.consume.runtime import run_messages
from worker.engine.checkpoint import Checkpoint, ModelConfig
from worker.lua import load_lua
from worker.store.snapshots import due, list_snapshots, rollback, take_snapshot

__all__ = ["cli", "own_runtime"]  # fixtures, imported for the tests below

PROBES = [InteractionData(user_id=f"probe-{i}", action_type="view", timestamp=i * 613) for i in range(6)]


def train(model: str, tag: str, n: int) -> list:
    return run_messages([step_message(f"{model}-{tag}{i}", raw_event(model, f"{tag}{i}")) for i in range(n)])


def test_due_when_a_commit_crosses_a_multiple() -> None:
    assert due(9_990, 10_010, 10_000)
    assert not due(10_000, 10_500, 10_000)
    assert not due(0, 50_000, 0)


def test_rollback_restores_predictions_as_a_new_version(own_runtime, make_model, redis_client) -> None:
    client, trainer, settings = redis_client, own_runtime.trainer, own_runtime.settings
    # Given a model snapshotted after 20 events, then trained on 20 more and snapshotted again
    model = make_model()
    train(model, "a", 20)
    first = take_snapshot(client, model, keep=10)
    before = predictions(trainer, model, PROBES)
    train(model, "b", 20)
    second = take_snapshot(client, model, keep=10)
    assert predictions(trainer, model, PROBES) != before
    assert [s.version for s in list_snapshots(client, model)] == [second, first]
    # When it is rolled back to the first snapshot
    version = rollback(client, model, first, settings)
    # Then it predicts exactly as then, under a version above every earlier one
    assert version > second
    assert predictions(trainer, model, PROBES) == before
    ckpt = own_runtime.store.load(model)
    assert (ckpt.version, ckpt.step) == (version, 40)  # step keeps counting the events trained
    # And an undone event re-sent answers duplicate; a new one trains as step 41
    # (under a new task id: the same message again would answer the trained result it lost)
    resent = run_messages([step_message(f"{model}-resent", raw_event(model, "b0"))])
    assert [s[2]["status"] for s in resent] == ["duplicate"]
    assert [s[2]["step"] for s in train(model, "c", 1)] == [41]


def test_only_the_last_k_snapshots_are_kept(own_runtime, make_model, redis_client) -> None:
    model = make_model()
    taken = []
    for round_ in range(5):
        train(model, f"k{round_}-", 2)
        taken.append(take_snapshot(redis_client, model, keep=3))
    assert [s.version for s in list_snapshots(redis_client, model)] == taken[::-1][:3]
    prefix = ModelKeys(model).snapshot_prefix.encode()
    assert len([k for k in redis_client.scan_iter(count=1000) if k.startswith(prefix)]) == 3


def test_rollback_refuses_a_missing_or_foreign_snapshot(own_runtime, make_model, redis_client) -> None:
    settings = Settings(redis_url=own_runtime.settings.redis_url)
    model = make_model()
    train(model, "f", 3)
    version = take_snapshot(redis_client, model, keep=10)
    with pytest.raises(ModelError, match=rf"no snapshot of version 999 \(kept: {version}\)"):
        rollback(redis_client, model, 999, settings)
    # A model replaced since (init --force) does not take the old model's weights
    own_runtime.store.create(model, Checkpoint.initial(ModelConfig()), force=True)
    with pytest.raises(ModelError, match="since replaced"):
        rollback(redis_client, model, version, settings)


def test_cli_lists_snapshots_and_rolls_back(own_runtime, cli, capsys, make_model, redis_client) -> None:
    model = make_model()
    train(model, "s", 2)
    version = take_snapshot(redis_client, model, keep=10)
    train(model, "t", 2)
    capsys.readouterr()
    assert cli(["snapshots", "--model", model]) == 0
    assert str(version) in capsys.readouterr().out
    assert cli(["rollback", "--model", model, "--to", str(version)]) == 0
    assert f"the weights of version {version}" in capsys.readouterr().out
    assert cli(["rollback", "--model", model, "--to", "999"]) == 1
    assert "no snapshot of version 999" in one_line(capsys.readouterr().err)


def test_trainer_snapshots_every_n_steps_and_records_lock_times(
    redis_url, make_model, redis_client, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os

    from worker.consume import runtime as runtime_module
    from worker.consume.runtime import Runtime

    # Given a worker process that snapshots every 10 steps
    rt = Runtime(Settings(redis_url=redis_url, snapshot_every=10, snapshot_keep=3))
    monkeypatch.setattr(runtime_module, "_runtime", (os.getpid(), rt))
    model = make_model()
    # When 25 events train, 5 at a time (one critical section for each call)
    for k in range(5):
        train(model, f"auto{k}-", 5)
    # Then snapshots were taken as steps 10 and 20 were passed
    assert [s.step for s in list_snapshots(redis_client, model)] == [20, 10]
    # And each critical section's lock wait and hold went into the exporter's histograms
    stats = {k.decode(): float(v) for k, v in redis_client.hgetall(ModelKeys(model).lock_stats).items()}
    assert sum(v for k, v in stats.items() if k.startswith("w:") and k != "w:sum") == 5  # one per call
    assert sum(v for k, v in stats.items() if k.startswith("h:") and k != "h:sum") == 5
    assert stats["h:sum"] > 0


def test_the_snapshot_script_writes_nothing_when_its_declared_names_are_stale(
    own_runtime, make_model, redis_client
) -> None:
    """snapshot.lua touches only the hashes its caller names in KEYS, read just before: when the
    version or the list of kept snapshots is no longer what was read, it writes nothing."""
    # Given a model with one snapshot, trained on since
    model = make_model()
    keys = ModelKeys(model)
    train(model, "v", 2)
    kept = take_snapshot(redis_client, model, keep=10)
    train(model, "w", 2)
    current = int(redis_client.hget(keys.ckpt, "version"))
    script = redis_client.register_script(load_lua("worker.store", "snapshot"))
    names = [keys.ckpt, keys.snapshots, keys.eval_ring]
    # When the script is called with a stale version, or without the kept snapshot in the list
    stale_version = script(
        keys=[*names, f"{keys.snapshot_prefix}{kept}", f"{keys.snapshot_prefix}{kept}"],
        args=[10, 0, kept, kept],
    )
    stale_list = script(keys=[*names, f"{keys.snapshot_prefix}{current}"], args=[10, 0, current])
    # Then it refuses both and nothing changed
    assert (stale_version, stale_list) == (-1, -1)
    assert [s.version for s in list_snapshots(redis_client, model)] == [kept]
    assert not redis_client.exists(f"{keys.snapshot_prefix}{current}")
    # And take_snapshot, which reads them first, takes it
    assert take_snapshot(redis_client, model, keep=10) == current
    assert [s.version for s in list_snapshots(redis_client, model)] == [current, kept]
