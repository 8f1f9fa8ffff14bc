"""``producer.keys``: every key of a model hashes to the model's one Redis Cluster slot."""

from __future__ import annotations

import inspect

from redis.crc import key_slot

from producer.keys import MODELS, UNROUTED_DEAD, ModelKeys


def model_keys(keys: ModelKeys) -> dict[str, str]:
    """Every key name ``ModelKeys`` makes (each property, and markers and snapshots)."""
    names = {
        name: getattr(keys, name)
        for name, value in inspect.getmembers(type(keys))
        if isinstance(value, property) and name not in ("prefix", "snapshot_prefix")
    }
    names["done"] = keys.done(3, 123_456)
    names["snapshot"] = keys.snapshot_prefix + "42"
    return names


def test_every_key_of_a_model_is_in_the_slot_of_its_hash_tag() -> None:
    for model in ("default", "a.b-c_9", "x" * 64):
        keys = model_keys(ModelKeys(model))
        assert len(keys) >= 11
        slots = {name: key_slot(key.encode()) for name, key in keys.items()}
        assert set(slots.values()) == {key_slot(ModelKeys(model).ckpt.encode())}, slots


def test_the_shared_keys_are_in_other_slots() -> None:
    # (Why the project does not claim to run on a Redis Cluster: see producer/keys.py.)
    ckpt = key_slot(ModelKeys("default").ckpt.encode())
    assert key_slot(MODELS.encode()) != ckpt
    assert key_slot(UNROUTED_DEAD.encode()) != ckpt
