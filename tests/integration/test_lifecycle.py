"""A model's lifecycle: ``itrain delete`` (a model and every key it has go; other models stay as
they were) and ``itrain models``."""

from __future__ import annotations

import re
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from producer.errors import ModelNotInitialisedError
from producer.keys import MODELS, ModelKeys
from tests.helpers import check_each_event_once, make_events, raw_event
from tests.integration.test_cli import cli, one_line
from tests.integration.test_run_messages import own_runtime, step_message
from worker.consume.runtime import run_messages
from worker.ops.lifecycle import BATCH, delete_model

__all__ = ["cli", "own_runtime"]  # fixtures, imported for the tests below


def keys_of(client, model: str) -> list[bytes]:
    return list(client.scan_iter(match=ModelKeys(model).prefix.replace("{", "\\{").replace("}", "\\}") + "*"))


def test_delete_leaves_no_key_of_the_model(own_runtime, make_model, redis_client) -> None:
    # Given two trained models, one of them with markers in more than one batch of keys, a
    # failure (dead letter) and counters
    model, other = make_model(), make_model()
    run_messages([step_message(f"{model}-{i}", raw_event(model, f"d{i}")) for i in range(30)])
    run_messages([step_message(f"{model}-bad", raw_event(model, "bad", action_type="no-target"))])
    run_messages([step_message(f"{other}-{i}", raw_event(other, f"o{i}")) for i in range(5)])
    for slot in range(BATCH + 5):  # old marker slots of an earlier generation
        redis_client.hset(ModelKeys(model).done(0, slot), "x", 1)
    assert len(keys_of(redis_client, model)) > BATCH
    other_keys = sorted(keys_of(redis_client, other))
    other_ckpt = redis_client.hgetall(ModelKeys(other).ckpt)
    # When the model is deleted
    removed = delete_model(redis_client, model)
    # Then none of its keys is left, it is no longer listed, and the other model is untouched
    assert keys_of(redis_client, model) == []
    assert removed > BATCH
    assert not redis_client.sismember(MODELS, model)
    assert redis_client.sismember(MODELS, other)
    assert sorted(keys_of(redis_client, other)) == other_keys
    assert redis_client.hgetall(ModelKeys(other).ckpt) == other_ckpt
    # And an event for it now answers skipped (the spec's no-op), nothing recreated
    (summary,) = run_messages([step_message(f"{model}-late", raw_event(model, "late"))])
    assert summary[2]["status"] == "skipped"
    with pytest.raises(ModelNotInitialisedError):
        delete_model(redis_client, model)


def test_cli_delete_needs_yes(cli, capsys, make_model, redis_client) -> None:
    model = make_model()
    assert cli(["delete", "--model", model]) == 1
    assert "add --yes" in one_line(capsys.readouterr().err)
    assert redis_client.exists(ModelKeys(model).ckpt) == 1
    assert cli(["delete", "--model", model, "--yes"]) == 0
    assert redis_client.exists(ModelKeys(model).ckpt) == 0


def test_models_lists_step_version_and_last_update(own_runtime, cli, capsys, make_model) -> None:
    fresh, trained = make_model(), make_model()
    run_messages([step_message(f"{trained}-{i}", raw_event(trained, f"m{i}")) for i in range(3)])
    capsys.readouterr()
    assert cli(["models"]) == 0
    # (Captured output is no terminal: a Markdown table, every column whole.)
    lines = capsys.readouterr().out.splitlines()
    cells = ([c.strip() for c in line.split("|")[1:-1]] for line in lines if line.startswith("|"))
    header, *body = cells
    rows = {row[0]: dict(zip(header, row, strict=True)) for row in body}
    assert rows[trained]["step"] == "3"
    assert rows[trained]["queue"] == "itrain"  # not routed: the default queue
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", rows[trained]["last update (UTC)"])
    assert rows[fresh]["last update (UTC)"] == "-"  # never committed


def test_two_models_trained_concurrently_stay_isolated(
    workers, redis_url, make_model, make_client, redis_client
) -> None:
    """Two models fed at once, from two threads, by two workers: each one's step equals its own
    events, its markers and history name only its own events, and deleting one leaves the other."""
    queue = f"itrain-two-{uuid.uuid4().hex[:6]}"
    workers.start(2, redis_url=redis_url, env={"ITRAIN_QUEUE": queue, "ITRAIN_HISTORY_MAX": "5000"})
    first, second = make_model(), make_model()
    sizes = {first: 700, second: 400}

    def feed(model: str) -> list:
        client = make_client(redis_url, queue=queue, chunk_size=50)
        events = make_events(model, sizes[model], f"iso-{model}")
        handles = [*client.train_many(events[:300]), *[client.train_step(e) for e in events[300:350]]]
        handles += client.train_many(events[350:])
        return [e["event_id"] for e in events], client.wait_all(handles, timeout=120)

    with ThreadPoolExecutor(2) as pool:
        (ids_a, res_a), (ids_b, res_b) = pool.map(feed, [first, second])
    for model, ids, results in ((first, ids_a, res_a), (second, ids_b, res_b)):
        assert {r["status"] for r in results} == {"trained"}
        assert {r["model"] for r in results} == {model}
        evidence = check_each_event_once(redis_client, model, ids)
        assert evidence["step"] == evidence["marked"] == sizes[model]
    # And deleting one model leaves the other as it was
    before = redis_client.hgetall(ModelKeys(second).ckpt)
    delete_model(redis_client, first)
    assert redis_client.hgetall(ModelKeys(second).ckpt) == before
