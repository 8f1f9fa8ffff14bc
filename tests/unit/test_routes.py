"""Routes without Redis: queue names, the routes' copy, and ``train_many``'s grouping by queue
(each queue's events in the caller's order, handles in input order)."""

from __future__ import annotations

import base64
from collections.abc import Iterator
from typing import Any

import orjson
import pytest
import redis

from producer.celery_config import make_celery
from producer.errors import QueueNameError
from producer.linger import LingerBuffers
from producer.outgoing import Outgoing
from producer.publishing import push_commands, push_error
from producer.routes import Routes, check_queue_name, group_by_queue, parse_routes
from producer.settings import Settings
from tests.helpers import make_event
from worker.ops.acl import acl_lines

#: Nothing listens there: these tests never reach a server.
NOWHERE = "redis://127.0.0.1:9/0"


@pytest.fixture
def settings() -> Settings:
    return Settings(redis_url=NOWHERE, chunk_size=3)


@pytest.fixture
def outgoing(settings: Settings) -> Iterator[Outgoing]:
    app = make_celery(settings, main="itrain-test", producer=True)
    routes = Routes(settings.queue, settings.routes_ttl)
    yield Outgoing(settings, app, routes)
    app.close()


def decode(message: bytes) -> tuple[str, str, list[Any]]:
    """(queue, task id, events) of a ``train_batch`` message."""
    envelope = orjson.loads(message)
    args = orjson.loads(base64.b64decode(envelope["body"]))[0]
    return envelope["properties"]["delivery_info"]["routing_key"], envelope["headers"]["id"], args[0]


@pytest.mark.parametrize(
    "name", ["itrain", "itrain.a", "itrain.tenant-7", "itrain.A_b-9", "itrain." + "x" * 64]
)
def test_queue_names_one_pattern_covers_are_accepted(name: str) -> None:
    assert check_queue_name(name, "itrain") == name


@pytest.mark.parametrize(
    "name",
    [
        "other",
        "itrain.",
        "itrain:models",
        "itrain.a.b",
        "itrain.a b",
        "itrainx",
        "itrain.*",
        "itrain." + "x" * 65,
    ],
)
def test_other_queue_names_are_refused_naming_the_rule(name: str) -> None:
    with pytest.raises(QueueNameError, match=r"itrain\.<suffix>"):
        check_queue_name(name, "itrain")


def test_parse_routes_keeps_valid_routes_only() -> None:
    # Given a hash with a default-queue entry and one written by hand naming a model key
    raw = {b"a": b"itrain.a", b"b": b"itrain", b"c": b"itrain:{c}:ckpt", b"d": b"itrain.d"}
    # Then only the models on a queue of their own are routed; the others use the default queue
    assert parse_routes(raw, "itrain") == {"a": "itrain.a", "d": "itrain.d"}
    routes = Routes("itrain", ttl=5.0)
    routes.update([b"a", b"itrain.a", b"c", b"nope"])  # RESP2's flat HGETALL reply
    assert (routes.queue("a"), routes.queue("c"), routes.queue("zzz")) == ("itrain.a", "itrain", "itrain")


def test_routes_are_due_after_their_ttl() -> None:
    routes = Routes("itrain", ttl=60.0)
    assert routes.due()  # never read
    routes.update({})
    assert not routes.due()
    assert Routes("itrain", ttl=0.0).due()
    zero = Routes("itrain", ttl=0.0)
    zero.update({})
    assert zero.due()  # ITRAIN_ROUTES_TTL=0: read at every call


def test_group_by_queue_keeps_input_order_within_each_queue() -> None:
    groups = group_by_queue(["q.b", "q", "q.b", "q.c", "q", "q.b"])
    assert list(groups) == ["q.b", "q", "q.c"]  # by first appearance
    assert groups == {"q.b": [0, 2, 5], "q": [1, 4], "q.c": [3]}
    assert group_by_queue([]) == {}


def test_train_many_groups_by_route_with_handles_in_input_order(outgoing: Outgoing) -> None:
    # Given models a and b on their own queues, c on the default one, events interleaved
    outgoing.routes.update({"a": "itrain.a", "b": "itrain.b"})
    models = ["a", "b", "c", "a", "a", "b", "c", "a", "a"]
    events = [make_event(m, i, "grp") for i, m in enumerate(models)]
    # When they are turned into messages
    pushes, handles, event_ids = outgoing.many(events, result=True)
    # Then there is one group per queue, in order of first appearance, each in the input order
    assert [q for q, _ in pushes] == ["itrain.a", "itrain.b", "itrain"]
    seen: dict[str, tuple[str, int, str]] = {}  # event id -> (queue, index in chunk, chunk id)
    for queue, messages in pushes:
        order = []
        for message in messages:
            routing_key, chunk_id, chunk_events = decode(message)
            assert routing_key == queue
            assert len(chunk_events) <= 3  # ITRAIN_CHUNK_SIZE
            for k, e in enumerate(chunk_events):
                seen[e["event_id"]] = (queue, k, chunk_id)
                order.append(int(e["event_id"].split("-")[1]))
        assert order == sorted(order)
        expected = {"itrain.a": "a", "itrain.b": "b", "itrain": "c"}[queue]
        assert {models[i] for i in order} == {expected}
    # And the handles are in input order: handle i reads event i's entry of its chunk
    assert event_ids == [e["event_id"] for e in events]
    assert len(handles) == len(events)
    for event, handle in zip(events, handles, strict=True):
        _, index, chunk_id = seen[event["event_id"]]
        assert handle.id == f"{chunk_id}:{index}"


def test_train_many_without_routes_is_one_group_on_the_default_queue(outgoing: Outgoing) -> None:
    events = [make_event(m, i, "one") for i, m in enumerate(["a", "b", "a", "c"])]
    pushes, handles, _ = outgoing.many(events, result=True)
    assert [q for q, _ in pushes] == ["itrain"]
    assert [decode(m)[0] for m in pushes[0][1]] == ["itrain", "itrain"]
    assert [h.id.rsplit(":", 1)[1] for h in handles] == ["0", "1", "2", "0"]


def test_train_step_and_predict_go_to_the_models_queue(outgoing: Outgoing) -> None:
    outgoing.routes.update({"a": "itrain.a"})
    from producer.outgoing import event_json

    data, shown = event_json(make_event("a", 1, "st"))
    queue, message = outgoing.step("tid", data, shown, result=True)
    assert queue == "itrain.a"
    assert orjson.loads(message)["properties"]["delivery_info"]["routing_key"] == "itrain.a"
    _, queue, message = outgoing.predict(make_event("c", 2, "st"))
    assert queue == "itrain"
    assert orjson.loads(message)["properties"]["delivery_info"]["routing_key"] == "itrain"


def test_linger_batch_is_routed_when_sent_one_message_per_queue(settings: Settings) -> None:
    app = make_celery(settings, main="itrain-test", producer=True)
    buffers = LingerBuffers(app, queue="itrain", linger_ms=5, max_events=10, max_message_bytes=1 << 20)
    try:
        # Given events of a routed model and of another, interleaved in one batch
        for i, model in enumerate(["a", "c", "a", "c", "a"]):
            buffers.put(
                f"id-{i}", orjson.dumps(make_event(model, i)), f"ev-{i}", 100, ignored=False, model=model
            )
        (batch,) = buffers.take_all()
        # When it is sent with the routes as they are then
        routes = Routes("itrain", ttl=5.0)
        routes.update({"a": "itrain.a"})
        pushes = buffers.messages(batch, routes.queue)
        # Then it leaves as one message per queue, each naming its queue, each in the calls' order
        assert [q for q, _ in pushes] == ["itrain.a", "itrain"]
        for queue, (message,) in pushes:
            envelope = orjson.loads(message)
            assert envelope["properties"]["delivery_info"]["routing_key"] == queue
            ids, events = orjson.loads(base64.b64decode(envelope["body"]))[0]
            expected = [0, 2, 4] if queue == "itrain.a" else [1, 3]
            assert ids == [f"id-{i}" for i in expected]
            assert [e["event_id"] for e in events] == [f"ev-{i}" for i in expected]
    finally:
        app.close()


def test_push_commands_are_one_lpush_or_one_transaction() -> None:
    assert push_commands([("q", [b"1", b"2"])]) == [("LPUSH", "q", b"1", b"2")]
    assert push_commands([("q", [b"1"]), ("q.a", [b"2", b"3"])]) == [
        ("MULTI",),
        ("LPUSH", "q", b"1"),
        ("LPUSH", "q.a", b"2", b"3"),
        ("EXEC",),
    ]


def test_push_error_finds_the_refusal_before_execabort() -> None:
    nope = redis.exceptions.NoPermissionError("NOPERM no permissions to access the 'q.b' key")
    abort = redis.ResponseError("EXECABORT Transaction discarded because of previous errors.")
    assert push_error([b"OK", b"QUEUED", nope, abort]) is nope
    assert push_error([b"OK", b"QUEUED", b"QUEUED", [3, 4]]) is None
    wrongtype = redis.ResponseError("WRONGTYPE")
    assert push_error([b"OK", b"QUEUED", b"QUEUED", [3, wrongtype]]) is wrongtype
    assert push_error([7]) is None


def test_acl_producer_reads_routes_and_may_be_limited_to_some_queues() -> None:
    # Given the producer role for every queue, and one limited to two queues
    every = set(acl_lines("producer", "p", "itrain", "pw")[1].split())
    limited = set(acl_lines("producer", "p", "itrain", "pw", queues=["itrain.a", "itrain.b"])[1].split())
    # Then both read the routes; the first may push to every queue, the second to its own only
    assert {"~itrain", "~itrain.*", "%R~itrain:routes", "+hgetall"} <= every
    assert {"~itrain.a", "~itrain.b", "%R~itrain.a??[0-9]", "%R~itrain:routes", "+hgetall"} <= limited
    assert not {"~itrain", "~itrain.*", "%R~itrain??[0-9]"} & limited
