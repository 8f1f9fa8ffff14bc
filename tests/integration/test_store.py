"""The model store (``worker.store.model_store.Store``) and its Lua scripts, in process, against a
real redis-server: creation, the fenced commit, event markers, bounded lists, dead letters."""

from __future__ import annotations

import time

import numpy as np
import orjson
import pytest
import redis

from producer.errors import ModelExistsError
from producer.keys import MODELS, UNROUTED_DEAD, ModelKeys, marker_field
from producer.settings import Settings
from worker.engine.checkpoint import Checkpoint, ModelConfig
from worker.store.model_store import CommitResult, Store


def _commit(
    store: Store, model: str, expected: Checkpoint, ids: list[str], dead: list[bytes] | None = None
) -> CommitResult:
    return store.commit(
        model,
        expected=expected,
        params=(expected.theta + 1.0).tobytes(),
        event_ids=ids,
        loss_last=0.5,
        loss_ema=0.6,
        actions={"click": len(ids)},
        history=[orjson.dumps({"event_id": i}) for i in ids],
        dead=dead or [],
    )


def test_create_refuses_to_replace_without_force(store: Store, model_name: str) -> None:
    ckpt = Checkpoint.initial(ModelConfig(hidden=8))
    version = store.create(model_name, ckpt, force=False)
    with pytest.raises(ModelExistsError, match=model_name):
        store.create(model_name, ckpt, force=False)
    loaded = store.load(model_name)
    assert loaded is not None
    assert loaded.version == version
    assert loaded.step == 0
    np.testing.assert_array_equal(loaded.theta, ckpt.theta)
    # --force starts a new generation at a higher version: old markers no longer count
    again = store.create(model_name, ckpt, force=True)
    reloaded = store.load(model_name)
    assert reloaded is not None
    assert again > version
    assert reloaded.gen != loaded.gen
    assert model_name in store.models()


def test_commit_is_fenced_by_the_checkpoint_read(store: Store, model_name: str) -> None:
    # Given a checkpoint read by two workers
    store.create(model_name, Checkpoint.initial(ModelConfig()), force=False)
    first = store.load(model_name)
    assert first is not None
    # When the first commits, then the second commits on the same (now stale) read
    ok = _commit(store, model_name, first, ["a", "b"])
    stale = _commit(store, model_name, first, ["c"])
    # Then only the first lands: version, step and weights are the first commit's
    assert ok.ok
    assert not stale.ok
    now = store.load(model_name)
    assert now is not None
    assert (now.version, now.step) == (first.version + 1, 2)
    np.testing.assert_array_equal(now.theta, first.theta + 1.0)
    # And the refused commit wrote no marker
    assert store.read(model_name, None, ["a", "b", "c"]).done == [True, True, False]


def test_read_skips_the_weights_when_the_cached_copy_is_current(store: Store, model_name: str) -> None:
    store.create(model_name, Checkpoint.initial(ModelConfig()), force=False)
    fresh = store.read(model_name, None, [])
    assert fresh.state == "fresh"
    assert fresh.checkpoint is not None
    assert store.read(model_name, fresh.checkpoint, []).state == "unchanged"
    _commit(store, model_name, fresh.checkpoint, ["x"])
    assert store.read(model_name, fresh.checkpoint, []).state == "fresh"
    assert store.read("no-such-model", None, ["x"]).state == "missing"


def test_history_and_dead_letters_are_trimmed_and_counted(
    redis_client: redis.Redis, redis_url: str, model_name: str
) -> None:
    store = Store(redis_client, Settings(redis_url=redis_url, history_max=5, dead_letter_max=3))
    store.create(model_name, Checkpoint.initial(ModelConfig()), force=False)
    ckpt = store.load(model_name)
    assert ckpt is not None
    ids = [f"e{i}" for i in range(8)]
    dead = [orjson.dumps({"n": i}) for i in range(4)]
    assert _commit(store, model_name, ckpt, ids, dead=dead).ok
    keys = ModelKeys(model_name)
    history = [orjson.loads(h)["event_id"] for h in redis_client.lrange(keys.history, 0, -1)]
    assert history == ["e7", "e6", "e5", "e4", "e3"]  # newest first, the last five
    assert redis_client.llen(keys.dead) == 3
    assert int(redis_client.hget(keys.stats, "failures")) == 4
    assert int(redis_client.hget(keys.stats, "interactions")) == 8
    assert int(redis_client.hget(keys.actions, "click")) == 8


def test_dead_letters_of_unknown_models_go_to_the_unrouted_list(
    store: Store, redis_client: redis.Redis
) -> None:
    before = redis_client.llen(UNROUTED_DEAD)
    store.dead_letter("never-created", [b'{"reason": "x"}'])
    assert redis_client.llen(UNROUTED_DEAD) == before + 1
    assert not redis_client.sismember(MODELS, "never-created")
    assert not redis_client.exists(ModelKeys("never-created").dead)


def test_an_event_is_a_duplicate_for_the_whole_window_and_markers_expire_after_it(
    redis_client: redis.Redis, redis_url: str, model_name: str
) -> None:
    # Given a 40 s window (the floor for 1 delivery and 20 s visibility) and an event trained now
    settings = Settings(redis_url=redis_url, dedupe_ttl=40, visibility_timeout=20, max_deliveries=1)
    store = Store(redis_client, settings)
    store.create(model_name, Checkpoint.initial(ModelConfig()), force=False)
    ckpt = store.load(model_name)
    assert ckpt is not None
    trained_at = time.time()
    assert _commit(store, model_name, ckpt, ["edge"]).ok
    # Then a redelivery up to the window's edge finds it (whatever slot boundaries lie between)
    for later in (0.0, 9.9, 10.1, 25.0, 39.9):
        assert store.read(model_name, None, ["edge"], now=trained_at + later).done == [True], later
    # And past the window and its margin (two slots of 10 s) it no longer counts
    assert store.read(model_name, None, ["edge"], now=trained_at + 40 + 20 + 10.1).done == [False]
    # And its marker is one hash field in a slot key that expires no later than that
    (key,) = list(redis_client.scan_iter(match=ModelKeys(model_name).done_prefix(ckpt.gen) + "*"))
    assert redis_client.type(key) == b"hash"
    assert int(redis_client.hget(key, marker_field("edge"))) == 1
    assert 40 <= redis_client.ttl(key) <= 40 + 10 + 1  # the window, and at most one slot more


def test_markers_are_compact(redis_client: redis.Redis, store: Store, model_name: str) -> None:
    """One key per slot of time, not one per event: 1,000 events trained together add one key."""
    store.create(model_name, Checkpoint.initial(ModelConfig()), force=False)
    ckpt = store.load(model_name)
    assert ckpt is not None
    ids = [f"c{i}" for i in range(1000)]
    assert _commit(store, model_name, ckpt, ids).ok
    keys = list(redis_client.scan_iter(match=ModelKeys(model_name).done_prefix(ckpt.gen) + "*"))
    assert len(keys) == 1
    assert redis_client.hlen(keys[0]) == 1000
    # And each field is the event id's 12-byte digest, holding the step that trained it
    assert redis_client.hget(keys[0], marker_field("c7")) == b"8"
    assert redis_client.hget(keys[0], "c7") is None
    assert store.read(model_name, None, [*ids[:3], "never"]).done == [True, True, True, False]


def test_markers_of_large_batches_in_several_slots_are_found(
    redis_client: redis.Redis, redis_url: str, model_name: str
) -> None:
    """Thousands of ids (past Lua's unpack limit) in one commit and one read, markers spread over
    two slots, read with and without a cached checkpoint."""
    # Given a 40 s window (10 s slots), 2,500 events trained in the slot before this one (their
    # marker hash moved back a slot: commits take the slot from Redis's clock) and 2,500 in this one
    settings = Settings(redis_url=redis_url, dedupe_ttl=40, visibility_timeout=20, max_deliveries=1)
    store = Store(redis_client, settings)
    store.create(model_name, Checkpoint.initial(ModelConfig()), force=False)
    ckpt = store.load(model_name)
    assert ckpt is not None
    first, second = [f"a{i}" for i in range(2500)], [f"b{i}" for i in range(2500)]
    assert _commit(store, model_name, ckpt, first).ok
    (key,) = list(redis_client.scan_iter(match=ModelKeys(model_name).done_prefix(ckpt.gen) + "*"))
    slot = int(key.rsplit(b":", 1)[1])
    redis_client.rename(key, ModelKeys(model_name).done(ckpt.gen, slot - 1))
    ckpt = store.load(model_name)
    assert ckpt is not None
    now = time.time()
    assert _commit(store, model_name, ckpt, second).ok
    keys = list(redis_client.scan_iter(match=ModelKeys(model_name).done_prefix(ckpt.gen) + "*"))
    assert len(keys) == 2
    # When read 5 s later, with fresh ids mixed in, without and with a cached checkpoint
    asked = [*first[::3], *[f"n{i}" for i in range(1200)], *second[1::3]]
    expected = [not i.startswith("n") for i in asked]
    # Then every trained one is found and no other
    assert store.read(model_name, None, asked, now=now + 5).done == expected
    latest = store.load(model_name)
    assert store.read(model_name, latest, asked, now=now + 5).done == expected
    assert store.read(model_name, ckpt, asked, now=now + 5).done == expected  # an older copy


def test_a_commit_from_a_host_whose_clock_is_hours_off_writes_its_markers_in_redis_slot(
    redis_client: redis.Redis, redis_url: str, model_name: str
) -> None:
    """The commit script may touch only the marker hashes its caller names in KEYS: the caller
    names the slots around its own clock; a clock far off is told Redis's slot and commits again."""
    # Given a 40 s window (10 s slots), and a worker whose clock is an hour ahead of Redis's
    settings = Settings(redis_url=redis_url, dedupe_ttl=40, visibility_timeout=20, max_deliveries=1)
    store = Store(redis_client, settings)
    store.create(model_name, Checkpoint.initial(ModelConfig()), force=False)
    ckpt = store.load(model_name)
    assert ckpt is not None
    # When it commits two events
    done = store.commit(
        model_name,
        expected=ckpt,
        params=(ckpt.theta + 1.0).tobytes(),
        event_ids=["x", "y"],
        loss_last=0.5,
        loss_ema=0.6,
        actions={"click": 2},
        history=[],
        dead=[],
        now=time.time() + 3600,
    )
    # Then the commit landed once, its markers in the hash of Redis's slot, found by a read
    assert done.ok
    assert (done.version, done.first_step) == (ckpt.version + 1, 0)
    redis_slot = int(redis_client.time()[0]) // 10
    (key,) = list(redis_client.scan_iter(match=ModelKeys(model_name).done_prefix(ckpt.gen) + "*"))
    assert int(key.rsplit(b":", 1)[1]) in (redis_slot - 1, redis_slot)  # (a slot may end meanwhile)
    assert redis_client.hlen(key) == 2
    assert int(redis_client.hget(ModelKeys(model_name).ckpt, "step")) == 2
    assert store.read(model_name, None, ["x", "y", "z"]).done == [True, True, False]
