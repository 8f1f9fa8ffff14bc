"""``itrain dead-letters``: a model's dead letters as an operator reads them, from messages that
failed in a real ``run_messages`` and a real worker; never a user id."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import orjson
import pytest
from celery.result import AsyncResult

from producer.keys import ModelKeys
from tests.helpers import raw_event
from tests.integration.test_cli import one_line
from tests.integration.test_run_messages import batch_message, own_runtime, step_message
from worker.consume.runtime import run_messages

__all__ = ["own_runtime"]  # the fixture, imported for the tests below

SECRET = "SECRET-USER-7731"


def itrain(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        env={**os.environ, "ITRAIN_REDIS_URL": redis_url},
        capture_output=True,
        text=True,
        timeout=60,
    )


def listed(redis_url: str, model: str, *args: str) -> dict[str, Any]:
    done = itrain(redis_url, "dead-letters", "--model", model, "--json", *args)
    assert done.returncode == 0, done.stderr
    assert SECRET not in done.stdout
    reply: dict[str, Any] = json.loads(done.stdout)
    return reply


def test_lists_failures_newest_first_with_their_deliveries_and_no_user_id(
    own_runtime, make_model, redis_url: str
) -> None:
    # Given events of one user that fail three ways, on their first, second and third delivery,
    # among events that train
    model = make_model()
    good = [raw_event(model, f"ok{i}", user_id=SECRET) for i in range(5)]
    run_messages([step_message(f"t-ok{i}", e) for i, e in enumerate(good)])
    run_messages([step_message("t-long", raw_event(model, "long-user", user_id=SECRET * 20))])
    run_messages([step_message("t-zzz", raw_event(model, "no-target", user_id=SECRET, action_type="zzz"), 2)])
    bad_label = raw_event(model, "bad-label", user_id=SECRET, label=[0.5, 0.5])
    run_messages([batch_message(["t-label"], [bad_label], deliveries=3)])

    # When the operator lists them
    reply = listed(redis_url, model)

    # Then each is there, newest first, with its time, event id, error, message and deliveries
    assert reply["model"] == model
    assert reply["total"] == 3
    rows = reply["dead_letters"]
    assert [r["event_id"] for r in rows] == ["bad-label", "no-target", "long-user"]
    assert [r["error"] for r in rows] == ["TargetError", "TargetError", "InvalidEventError"]
    assert [r["deliveries"] for r in rows] == [3, 2, 1]
    assert rows[0]["message"] == f"label has 2 value(s) but model {model!r} has 1 output(s)"
    assert "ITRAIN_TARGETS" in rows[1]["message"]
    assert "user_id" in rows[2]["message"]
    assert rows[0]["time"] >= rows[1]["time"] >= rows[2]["time"]
    assert rows[1]["action_type"] == "zzz"
    # And --limit keeps the newest
    short = listed(redis_url, model, "--limit", "1")
    assert [r["event_id"] for r in short["dead_letters"]] == ["bad-label"]
    assert short["total"] == 3
    # And the table shows the same, with no user id either
    table = itrain(redis_url, "dead-letters", "--model", model)
    assert table.returncode == 0, table.stderr
    assert SECRET not in table.stdout
    assert "newest 3 of 3" in table.stdout
    for event_id, error, deliveries in (
        ("bad-label", "TargetError", "3"),
        ("long-user", "InvalidEventError", "1"),
    ):
        (line,) = [line for line in table.stdout.splitlines() if f" {event_id} " in line]
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[1:3] == [event_id, error]
        assert cells[4] == deliveries


def test_a_message_delivered_too_often_is_listed_with_its_count(
    own_runtime, make_model, redis_url: str
) -> None:
    # Given a message handed out more often than ITRAIN_MAX_DELIVERIES (5) allows
    model = make_model()
    run_messages([step_message("t-late", raw_event(model, "late", user_id=SECRET), deliveries=6)])
    # When listed
    (row,) = listed(redis_url, model)["dead_letters"]
    # Then its dead letter says how often it came
    assert row["error"] == "DeliveryLimitError"
    assert row["deliveries"] == 6
    assert "delivered 6 times" in row["message"]


def test_an_entry_shows_only_the_listed_fields_escaped(make_model, redis_client, redis_url: str) -> None:
    # Given entries written by another tool: one with more fields (a user id among them) and a
    # terminal code in its message, and one that is not JSON
    model = make_model()
    odd = {"at": "2026-01-02T03:04:05+00:00", "event_id": "x", "error": "E", "reason": "bad\x1b[31mred"}
    redis_client.lpush(ModelKeys(model).dead, orjson.dumps({**odd, "user_id": SECRET}), b"\xff not json")
    # When listed, as JSON and as a table
    rows = listed(redis_url, model)["dead_letters"]
    table = itrain(redis_url, "dead-letters", "--model", model).stdout
    # Then the extra field is not shown; the unreadable entry says so; no terminal code gets out
    assert rows[0]["message"] == "unreadable dead-letter entry"
    assert set(rows[1]) == {
        "time", "event_id", "task_id", "action_type", "error", "message", "deliveries", "events"
    }  # fmt: skip
    assert rows[1]["deliveries"] is None
    assert SECRET not in table
    assert "\x1b" not in table
    assert "bad\\x1b[31mred" in table


def test_a_real_worker_dead_letters_an_event_it_cannot_train(
    start_workers, client, make_model, redis_url: str
) -> None:
    # Given a worker, and an event whose action has no target
    model = make_model()
    start_workers(1)
    handle: AsyncResult = client.train_step(
        raw_event(model, "from-worker", user_id=SECRET, action_type="zzz")
    )
    # When it fails there
    with pytest.raises(Exception, match="ITRAIN_TARGETS"):
        handle.get(timeout=60)
    # Then its dead letter is listed, delivered once
    (row,) = listed(redis_url, model)["dead_letters"]
    assert row["event_id"] == "from-worker"
    assert row["error"] == "TargetError"
    assert row["deliveries"] == 1
    assert row["task_id"] == handle.id


@pytest.mark.parametrize(
    ("args", "code", "says"),
    [
        (["--model", "no-such-model"], 1, "model 'no-such-model' does not exist"),
        (["--model", "m", "--limit", "0"], 2, "--limit: must be at least 1"),
        ([], 2, "--model"),
    ],
    ids=["unknown-model", "limit-0", "no-model"],
)
def test_bad_input_is_one_line(redis_url: str, args: list[str], code: int, says: str) -> None:
    done = itrain(redis_url, "dead-letters", *args)
    assert done.returncode == code
    assert says in done.stderr
    if code == 1:
        assert says in one_line(done.stderr)
