"""Upgrades keep formats apart: the store's layout (``itrain:layout``) and the message format
(``itrain_format`` header) carry versions; a worker refuses a newer one in one line (a store) or
answers it FAILURE with a dead letter (a message); ``itrain migrate`` brings a store written the
old way (no layout key) up to this release's layout while workers keep training it.

Stores whose layout a test sets are private servers: the session's is shared with other tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson
import pytest
import redis

from producer.client import TrainingClient
from producer.errors import MessageFormatError, StoreLayoutError
from producer.formats import FORMAT_HEADER, STORE_LAYOUT
from producer.keys import LAYOUT, MODELS, ModelKeys
from producer.protocol import TASK_PREDICT, TASK_TRAIN_BATCH, TASK_TRAIN_STEP, encode_envelope, result_key
from producer.settings import Settings
from tests.conftest import ClientFactory
from tests.helpers import (
    Workers,
    check_each_event_once,
    create_model,
    evidence_env,
    make_event,
    make_events,
    model_state,
    raw_event,
    statuses,
    wait_results,
    wait_until,
)
from worker.consume import runtime
from worker.consume.messages import RawMessage
from worker.consume.runtime import Runtime, run_messages
from worker.devtools.embedded_redis import RedisServer
from worker.devtools.stack import start_worker
from worker.ops.acl import acl_lines, unknown_commands
from worker.store.layout import check_store_layout

ITRAIN = str(Path(sys.executable).with_name("itrain"))
NEWER = STORE_LAYOUT + 1


def _environ(url: str) -> dict[str, str]:
    """This environment without the session's Redis settings, on ``url``."""
    return {**{k: v for k, v in os.environ.items() if not k.startswith("ITRAIN_")}, "ITRAIN_REDIS_URL": url}


def itrain(url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [ITRAIN, *args], env=_environ(url), capture_output=True, text=True, timeout=120, check=False
    )


@pytest.fixture
def server() -> Iterator[RedisServer]:
    with RedisServer() as s:
        yield s


@pytest.fixture
def admin(server: RedisServer) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(server.url)
    yield client
    client.close()


# -- the store's layout ------------------------------------------------------------------------


def test_migrate_a_store_written_the_old_way_while_workers_train_it(
    server: RedisServer, admin: redis.Redis, workers: Workers, make_client: ClientFactory
) -> None:
    # Given a store written the old way (no itrain:layout key), holding a model a real worker trained
    model = create_model(admin, Settings(redis_url=server.url))
    env = evidence_env(60)
    workers.start(1, redis_url=server.url, env=env)
    client = make_client(server.url)
    before = make_events(model, 300, "before")
    assert statuses(wait_results(client, client.train_many(before), 120, workers)) == {"trained": 300}
    assert admin.get(LAYOUT) is None

    # When --dry-run describes the migration, then it says what it would do and writes nothing
    dry = itrain(server.url, "migrate", "--dry-run")
    assert dry.returncode == 0, dry
    assert "from layout 1 to 2" in dry.stdout
    assert "safe while workers of layout 1 run" in dry.stdout
    assert admin.get(LAYOUT) is None

    # When it migrates, twice, while the worker trains more events
    during = make_events(model, 300, "during")
    handles = client.train_many(during)
    first, second = itrain(server.url, "migrate"), itrain(server.url, "migrate")

    # Then the first run migrates and the second changes nothing
    assert first.returncode == 0, first
    assert "is at layout 2" in first.stdout.splitlines()[-1]
    assert second.returncode == 0, second
    assert "nothing to do" in second.stdout
    assert admin.get(LAYOUT) == str(STORE_LAYOUT).encode()

    # And a worker started now (it checks the layout) trains it beside the one that ran before
    workers.start(1, redis_url=server.url, env=env)
    after = make_events(model, 300, "after")
    results = wait_results(client, handles + client.train_many(after), 120, workers)
    assert statuses(results) == {"trained": 600}

    # And nothing was lost or trained twice: step == N, each event marked once
    ids = [e["event_id"] for e in before + during + after]
    assert check_each_event_once(admin, model, ids)["step"] == 900
    workers.assert_alive()


def test_a_worker_refuses_a_store_of_a_newer_layout_in_one_line(
    server: RedisServer, admin: redis.Redis, tmp_path: Path
) -> None:
    # Given a store whose layout a newer release wrote
    admin.set(LAYOUT, str(NEWER))
    # When a worker starts on it
    log = tmp_path / "worker.log"
    proc = start_worker("newer", _environ(server.url), concurrency=1, log=log)
    try:
        code = proc.wait(90)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"the worker did not exit:\n{log.read_text()[-3000:]}") from None
    # Then it exits non-zero with one line naming both layouts, and never took a message
    text = log.read_text(errors="replace")
    assert code != 0
    lines = [line for line in text.splitlines() if f"layout {NEWER}" in line]
    assert len(lines) == 1, text
    assert lines[0].startswith("error: ")
    assert f"(layout {STORE_LAYOUT})" in lines[0], lines[0]
    assert "Traceback" not in text
    assert admin.get(LAYOUT) == str(NEWER).encode()


@pytest.mark.parametrize(
    "args",
    [["stats"], ["models"], ["init", "--model", "n"], ["migrate"], ["migrate", "--dry-run"], ["snapshots"]],
)
def test_itrain_commands_refuse_a_store_of_a_newer_layout_in_one_line(
    server: RedisServer, admin: redis.Redis, args: list[str]
) -> None:
    admin.set(LAYOUT, str(NEWER))
    done = itrain(server.url, *args)
    assert done.returncode == 1, done
    (line,) = done.stderr.strip().splitlines()
    assert f"has layout {NEWER}, newer than this release reads (layout {STORE_LAYOUT})" in line
    assert server.url in line
    # and nothing was written
    assert admin.scard(MODELS) == 0
    assert admin.get(LAYOUT) == str(NEWER).encode()


def test_an_unreadable_layout_is_refused(server: RedisServer, admin: redis.Redis) -> None:
    admin.set(LAYOUT, "two")
    with pytest.raises(StoreLayoutError, match="not a layout version"):
        check_store_layout(Settings(redis_url=server.url))
    done = itrain(server.url, "migrate")
    assert done.returncode == 1
    assert "not a layout version" in done.stderr


def test_init_writes_the_layout_into_a_new_store_only(server: RedisServer, admin: redis.Redis) -> None:
    # Given a new store, when a model is made, then the store is at this release's layout
    assert itrain(server.url, "init", "--model", "first").returncode == 0
    assert admin.get(LAYOUT) == str(STORE_LAYOUT).encode()
    # Given a store of layout 1 that holds models, when another is made, then the layout is left
    # for `itrain migrate` (a later step may need the workers stopped)
    admin.delete(LAYOUT)
    assert itrain(server.url, "init", "--model", "second").returncode == 0
    assert admin.get(LAYOUT) is None
    assert check_store_layout(Settings(redis_url=server.url)) == 1


def test_every_role_that_reads_the_store_may_read_its_layout(server: RedisServer, admin: redis.Redis) -> None:
    # Given the users of `itrain acl` that read the store, on a migrated store
    admin.set(LAYOUT, str(STORE_LAYOUT))
    unknown = unknown_commands(admin)
    for role in ("reader", "monitor", "worker"):
        _, line = acl_lines(role, f"u-{role}", "itrain", password="pw", unknown=unknown)
        admin.execute_command(*line.split())
        url = server.url.replace("redis://", f"redis://u-{role}:pw@")
        # Then each reads the layout, and Redis denied nothing
        assert check_store_layout(Settings(redis_url=url)) == STORE_LAYOUT, role
    assert admin.acl_log() == []


def test_the_worker_role_migrates(server: RedisServer, admin: redis.Redis) -> None:
    # Given a layout-1 store and the worker user of `itrain acl`
    _, line = acl_lines("worker", "w", "itrain", password="pw", unknown=unknown_commands(admin))
    admin.execute_command(*line.split())
    # When it migrates, then the layout is written and Redis denied nothing
    done = itrain(server.url.replace("redis://", "redis://w:pw@"), "migrate")
    assert done.returncode == 0, done
    assert admin.get(LAYOUT) == str(STORE_LAYOUT).encode()
    assert admin.acl_log() == []


# -- the message format --------------------------------------------------------------------------


def _envelope(task: str, task_id: str, args: list[Any], fmt: Any = None) -> bytes:
    """What the client pushes; with ``fmt``, its format header says that instead."""
    envelope = orjson.loads(encode_envelope(task, task_id, args, "itrain"))
    if fmt is not None:
        envelope["headers"][FORMAT_HEADER] = fmt
    return orjson.dumps(envelope)


def _meta(client: redis.Redis, task_id: str) -> dict[str, Any]:
    raw = wait_until(lambda: client.get(result_key(task_id)), 60, f"the result of {task_id}")
    meta: dict[str, Any] = orjson.loads(raw)
    return meta


def test_producers_send_the_format_header(redis_url: str, make_client: ClientFactory) -> None:
    # Given a client on a queue no worker consumes
    queue = f"q-{uuid.uuid4().hex[:8]}"
    client = make_client(redis_url, queue=queue)
    # When it sends each kind of message
    client.train_step(make_event("m"))
    client.train_many(make_events("m", 3))
    client.predict(make_event("m"))
    # Then every one carries format 1
    raw = redis.Redis.from_url(redis_url).lrange(queue, 0, -1)
    headers = [orjson.loads(r)["headers"] for r in raw]
    assert sorted(h["task"] for h in headers) == sorted([TASK_TRAIN_STEP, TASK_TRAIN_BATCH, TASK_PREDICT])
    assert [h[FORMAT_HEADER] for h in headers] == [1, 1, 1]


def test_a_message_of_a_newer_format_fails_with_a_dead_letter_and_its_neighbours_train(
    start_workers: Any, make_model: Any, redis_url: str, client: TrainingClient, workers: Workers
) -> None:
    # Given a worker, and in one push: train_step messages of format 1, without the header (as
    # another language may send them), of format 2, with an unreadable header, and train_many
    # chunks of format 1 and 2
    model = make_model()
    start_workers(1)
    r = redis.Redis.from_url(redis_url)
    ids = {kind: str(uuid.uuid4()) for kind in ("ok", "absent", "newer", "junk", "chunk", "newer_chunk")}
    messages = [
        _envelope(TASK_TRAIN_STEP, ids["ok"], [raw_event(model, "ok")]),
        _envelope(TASK_TRAIN_STEP, ids["newer"], [raw_event(model, "newer")], fmt=2),
        _envelope(TASK_TRAIN_STEP, ids["junk"], [raw_event(model, "junk")], fmt="two"),
        _envelope(TASK_TRAIN_BATCH, ids["newer_chunk"], [[raw_event(model, f"nc-{i}") for i in range(3)]], 2),
        _envelope(TASK_TRAIN_BATCH, ids["chunk"], [[raw_event(model, f"c-{i}") for i in range(3)]]),
    ]
    absent = orjson.loads(_envelope(TASK_TRAIN_STEP, ids["absent"], [raw_event(model, "absent")]))
    del absent["headers"][FORMAT_HEADER]
    r.lpush("itrain", *messages, orjson.dumps(absent))

    # Then the newer and unreadable ones fail with MessageFormatError naming the versions
    for kind in ("newer", "junk", "newer_chunk"):
        meta = _meta(r, ids[kind])
        assert meta["status"] == "FAILURE", meta
        failed = (meta["result"]["exc_type"], meta["result"]["exc_module"])
        assert failed == ("MessageFormatError", "producer.errors")
    (text,) = _meta(r, ids["newer"])["result"]["exc_message"]
    assert "message format 2 is newer than this worker reads (format 1)" in text
    with pytest.raises(MessageFormatError, match="format 2"):
        client.handle(ids["newer"]).get(timeout=30)
    # And the others train
    assert _meta(r, ids["ok"])["result"]["status"] == "trained"
    assert _meta(r, ids["absent"])["result"]["status"] == "trained"
    chunk = _meta(r, ids["chunk"])["result"]["results"]
    assert [type(e) for e in chunk] == [list, list, list], chunk  # [step, version, loss]: trained
    assert model_state(r, model)["step"] == 5
    # And each refused message has one dead letter in its model's list, and was acknowledged, so
    # it is not delivered again
    wait_until(lambda: r.llen("itrain") == 0 and r.hlen("unacked") == 0, 60, "every message acknowledged")
    dead = [orjson.loads(e) for e in r.lrange(ModelKeys(model).dead, 0, -1)]
    assert sorted(d["task_id"] for d in dead) == sorted(ids[k] for k in ("newer", "junk", "newer_chunk"))
    assert {d["error"] for d in dead} == {"MessageFormatError"}
    workers.assert_alive()

    # And a prediction asked in a newer format fails the same way
    handle = client.app.send_task(
        TASK_PREDICT, args=[raw_event(model, "p")], queue="itrain", headers={FORMAT_HEADER: 2}
    )
    with pytest.raises(MessageFormatError, match="format 2"):
        handle.get(timeout=30)
    r.close()


@pytest.fixture
def own_runtime(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> Runtime:
    rt = Runtime(Settings(redis_url=redis_url))
    monkeypatch.setattr(runtime, "_runtime", (os.getpid(), rt))
    return rt


def test_in_one_pool_job_only_the_newer_message_fails(own_runtime: Runtime, make_model: Any) -> None:
    # Given three train_step messages of one pool job, the second of a newer format
    model = make_model()
    ids = [str(uuid.uuid4()) for _ in range(3)]
    body = [orjson.dumps([[raw_event(model, f"e{i}")], {}, {}]) for i in range(3)]
    messages = [
        RawMessage(TASK_TRAIN_STEP, task_id, "application/json", "utf-8", None, data)
        for task_id, data in zip(ids, body, strict=True)
    ]
    messages[1] = replace(messages[1], message_format=2)
    # When they run together
    summaries = run_messages(messages)
    # Then the second fails naming MessageFormatError, and the others train in the same job
    assert [s[1] for s in summaries] == ["SUCCESS", "FAILURE", "SUCCESS"]
    assert summaries[1][2].exc_type == "MessageFormatError"
    assert [s[2]["step"] for s in (summaries[0], summaries[2])] == [1, 2]
