"""Unit tests of the event (``producer.events.InteractionData``): every rule of the contract's table,
the one-line error summary, and validation before publishing."""

from __future__ import annotations

import math
import uuid
from datetime import UTC, datetime, timedelta, timezone

import orjson
import pydantic
import pytest

from producer.events import (
    CONTEXT_KEY_MAX,
    CONTEXT_MAX_ENTRIES,
    CONTEXT_VALUE_MAX,
    EVENT_LIST,
    INT64_MAX,
    INT64_MIN,
    InteractionData,
    describe_validation_error,
)


def fields(**overrides) -> dict:
    base = {"user_id": "u1", "action_type": "click", "timestamp": 1_700_000_000}
    base.update(overrides)
    return base


def rejected(**overrides) -> pydantic.ValidationError:
    """The validation error of an event with these fields (fails the test if it is accepted)."""
    with pytest.raises(pydantic.ValidationError) as info:
        InteractionData(**fields(**overrides))
    return info.value


def assert_names(exc: pydantic.ValidationError, field: str) -> None:
    """The error is about ``field``, in pydantic's report and in the one-line summary."""
    assert {str(e["loc"][0]) for e in exc.errors()} == {field}, exc.errors()
    assert field in str(exc)
    assert describe_validation_error(exc).startswith(field), describe_validation_error(exc)


# -- event_id -------------------------------------------------------------------------------------


def test_event_id_is_generated_uuid4_when_absent() -> None:
    """A missing event_id becomes a fresh UUID4, different for each event."""
    # Given two events without an event_id
    a = InteractionData(**fields())
    b = InteractionData(**fields())
    # Then each got a UUID4 of its own
    assert uuid.UUID(a.event_id).version == 4
    assert str(uuid.UUID(a.event_id)) == a.event_id
    assert a.event_id != b.event_id


@pytest.mark.parametrize("event_id", ["e", "x" * 128, "order-42:click"])
def test_event_id_given_is_kept(event_id) -> None:
    """A given event_id of 1 to 128 characters is kept as is."""
    # When an event has an explicit id
    ev = InteractionData(**fields(event_id=event_id))
    # Then it is kept
    assert ev.event_id == event_id


@pytest.mark.parametrize("event_id", ["x" * 129, "", 42])
def test_event_id_invalid_is_rejected(event_id) -> None:
    """Longer than 128 characters, empty, or not a string: rejected, naming event_id."""
    assert_names(rejected(event_id=event_id), "event_id")


# -- user_id and action_type ----------------------------------------------------------------------


@pytest.mark.parametrize(("field", "longest"), [("user_id", 256), ("action_type", 64)])
def test_string_fields_accept_one_to_max_chars(field, longest) -> None:
    """user_id takes 1 to 256 characters, action_type 1 to 64."""
    # When the shortest and the longest values are given
    short = InteractionData(**fields(**{field: "a"}))
    long = InteractionData(**fields(**{field: "b" * longest}))
    # Then both are accepted unchanged
    assert getattr(short, field) == "a"
    assert getattr(long, field) == "b" * longest


@pytest.mark.parametrize(("field", "longest"), [("user_id", 256), ("action_type", 64)])
@pytest.mark.parametrize("kind", ["empty", "too_long", "missing", "not_a_string"])
def test_string_fields_out_of_bounds_rejected(field, longest, kind) -> None:
    """Empty, too long, missing or non-string user_id / action_type: rejected, naming the field."""
    # Given a bad value for the field
    if kind == "missing":
        data = fields()
        del data[field]
        with pytest.raises(pydantic.ValidationError) as info:
            InteractionData(**data)
        exc = info.value
    else:
        value = {"empty": "", "too_long": "c" * (longest + 1), "not_a_string": 123}[kind]
        exc = rejected(**{field: value})
    # Then the error names the field
    assert_names(exc, field)


# -- timestamp ------------------------------------------------------------------------------------


def test_timestamp_datetime_aware_utc_kept() -> None:
    """An aware UTC datetime is kept."""
    # Given an aware UTC datetime
    ts = datetime(2024, 3, 1, 8, 30, 15, 123456, tzinfo=UTC)
    # Then the event holds it
    assert InteractionData(**fields(timestamp=ts)).timestamp == ts


def test_timestamp_naive_datetime_is_utc() -> None:
    """A naive datetime is read as UTC."""
    # Given a naive datetime
    ev = InteractionData(**fields(timestamp=datetime(2024, 3, 1, 8, 30)))
    # Then it is that wall-clock time in UTC
    assert ev.timestamp == datetime(2024, 3, 1, 8, 30, tzinfo=UTC)
    assert ev.timestamp.utcoffset() == timedelta(0)


def test_timestamp_aware_non_utc_is_converted() -> None:
    """An aware datetime in another zone becomes the same instant in UTC."""
    # Given 10:00 at UTC+2
    ts = datetime(2024, 3, 1, 10, 0, tzinfo=timezone(timedelta(hours=2)))
    # When validated
    ev = InteractionData(**fields(timestamp=ts))
    # Then it is 08:00 UTC
    assert ev.timestamp == ts
    assert ev.timestamp.utcoffset() == timedelta(0)
    assert ev.timestamp.hour == 8


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2024-03-01T08:30:00Z", datetime(2024, 3, 1, 8, 30, tzinfo=UTC)),
        ("2024-03-01T10:30:00+02:00", datetime(2024, 3, 1, 8, 30, tzinfo=UTC)),
        ("2024-03-01T08:30:00", datetime(2024, 3, 1, 8, 30, tzinfo=UTC)),
    ],
)
def test_timestamp_iso_string(value, expected) -> None:
    """ISO 8601 strings are parsed; a naive one is UTC."""
    # When validated
    ev = InteractionData(**fields(timestamp=value))
    # Then the instant and its zone are right
    assert ev.timestamp == expected
    assert ev.timestamp.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (0, datetime(1970, 1, 1, tzinfo=UTC)),
        (1_700_000_000, datetime(2023, 11, 14, 22, 13, 20, tzinfo=UTC)),
        (1_700_000_000.25, datetime(2023, 11, 14, 22, 13, 20, 250000, tzinfo=UTC)),
        # Large values are still seconds (pydantic alone would read them as milliseconds).
        (30_000_000_000, datetime(1970, 1, 1, tzinfo=UTC) + timedelta(seconds=30_000_000_000)),
    ],
)
def test_timestamp_epoch_seconds(value, expected) -> None:
    """Numbers are epoch seconds, int or float, always in UTC."""
    # When validated
    ev = InteractionData(**fields(timestamp=value))
    # Then the instant is that many seconds after the epoch
    assert ev.timestamp == expected
    assert ev.timestamp.utcoffset() == timedelta(0)


@pytest.mark.parametrize(
    "value",
    [math.nan, math.inf, -math.inf, -1, -0.5, True, False, 1e13, "not a time", None],
    ids=["nan", "inf", "-inf", "neg-int", "neg-float", "true", "false", "beyond-9999", "text", "none"],
)
def test_timestamp_invalid_rejected(value) -> None:
    """NaN, infinities, negative numbers, booleans, absurd or unparsable values: rejected."""
    assert_names(rejected(timestamp=value), "timestamp")


def test_timestamp_epoch_numbers_are_fromtimestamp_exactly() -> None:
    """Epoch numbers (read without pydantic's datetime parsing, by exact type) give exactly
    ``datetime.fromtimestamp(value, UTC)``, microsecond rounding included; an int subclass that
    is not a bool takes the general path to the same instant."""
    # Given floats with every kind of fraction, ints, and the range's ends
    values = [i * 7_919.123457 + i / 1e7 for i in range(2000)] + [0, 0.0, -0.0, 1, 253_402_300_799]
    for value in values:
        # When validated
        ts = InteractionData(**fields(timestamp=value)).timestamp
        # Then the same instant and zone as fromtimestamp gives
        assert ts == datetime.fromtimestamp(value, tz=UTC)
        assert ts.tzinfo is UTC

    class Seconds(int):
        pass

    minute = InteractionData(**fields(timestamp=Seconds(60))).timestamp
    assert minute == datetime(1970, 1, 1, 0, 1, tzinfo=UTC)


@pytest.mark.parametrize("text", ["-1", "-86400.5", "30000000000", "1700000000"])
def test_timestamp_numeric_string_is_epoch_seconds_or_rejected(text) -> None:
    """A numeric string follows the rules of the number: same instant, or rejected like it."""
    # Given the number and its string form
    number = float(text)
    try:
        as_number = InteractionData(**fields(timestamp=number)).timestamp
    except pydantic.ValidationError:
        as_number = None
    # When the string form is validated
    try:
        as_text = InteractionData(**fields(timestamp=text)).timestamp
    except pydantic.ValidationError:
        as_text = None
    # Then it is rejected when the number is, and otherwise the same instant or rejected
    if as_number is None:
        assert as_text is None, f"timestamp {text!r} accepted as {as_text}, but {number} is rejected"
    else:
        assert as_text in (None, as_number), (
            f"timestamp {text!r} read as {as_text}, the number as {as_number}"
        )


@pytest.mark.parametrize(
    "value",
    [
        "0001-01-01T00:00:00+01:00",
        "0001-01-01T00:59:59+01:00",
        "9999-12-31T23:59:59-01:00",
        "9999-12-31T23:30:00-00:31",
        datetime(1, 1, 1, tzinfo=timezone(timedelta(hours=1))),
        datetime(9999, 12, 31, 23, 59, tzinfo=timezone(timedelta(hours=-2))),
    ],
    ids=[
        "year-1-plus-1h",
        "year-1-plus-1h-late",
        "year-9999-minus-1h",
        "year-9999-minus-31m",
        "dt-min",
        "dt-max",
    ],
)
def test_timestamp_beyond_utc_range_rejected(value) -> None:
    """A date at the limits whose offset moves it out of years 1-9999 in UTC: a ValueError naming
    timestamp, never an OverflowError (which a worker would take for its own fault)."""
    # When validated, alone and in a list
    exc = rejected(timestamp=value)
    with pytest.raises(pydantic.ValidationError) as in_list:
        EVENT_LIST.validate_python([fields(), fields(timestamp=value)])
    # Then both name the field, say why, and are ValueErrors
    assert_names(exc, "timestamp")
    assert isinstance(exc, ValueError)
    assert "out of range" in describe_validation_error(exc)
    assert [e["loc"][:2] for e in in_list.value.errors()] == [(1, "timestamp")]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0001-01-01T00:00:00Z", datetime(1, 1, 1, tzinfo=UTC)),
        ("0001-01-01T01:00:00+01:00", datetime(1, 1, 1, tzinfo=UTC)),
        ("9999-12-31T23:59:59Z", datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)),
        ("9999-12-31T22:59:59-01:00", datetime(9999, 12, 31, 23, 59, 59, tzinfo=UTC)),
    ],
)
def test_timestamp_at_utc_limits_accepted(value, expected) -> None:
    """The first and last instants a UTC datetime can hold are still accepted, whatever the offset."""
    assert InteractionData(**fields(timestamp=value)).timestamp == expected


# -- context --------------------------------------------------------------------------------------


def test_context_flat_values_keep_their_types() -> None:
    """str, int, float and bool values are accepted and keep their exact types."""
    # Given a flat context of every allowed kind
    ctx = {"s": "home", "i": 3, "f": 0.5, "b": True, "one": "1", "zero": 0, "no": False}
    # When validated
    ev = InteractionData(**fields(context=ctx))
    # Then values and types are kept (True is not 1, "1" is not 1)
    assert ev.context == ctx
    assert {k: type(v) for k, v in ev.context.items()} == {k: type(v) for k, v in ctx.items()}


@pytest.mark.parametrize("ctx", [None, {}])
def test_context_absent_or_empty(ctx) -> None:
    """The context may be null or empty."""
    assert InteractionData(**fields(context=ctx)).context == ctx


def test_context_limits_inclusive() -> None:
    """64 entries, 64-character keys and 256-character values are all accepted."""
    # Given a context at every limit
    ctx = {f"{i:0{CONTEXT_KEY_MAX}d}": "v" * CONTEXT_VALUE_MAX for i in range(CONTEXT_MAX_ENTRIES)}
    # When validated
    ev = InteractionData(**fields(context=ctx))
    # Then it is accepted whole
    assert ev.context == ctx
    assert (CONTEXT_MAX_ENTRIES, CONTEXT_KEY_MAX, CONTEXT_VALUE_MAX) == (64, 64, 256)


@pytest.mark.parametrize(
    "ctx",
    [
        {f"k{i}": i for i in range(65)},
        {"k" * 65: 1},
        {"": 1},
        {"k": "v" * 257},
        {"k": {"nested": 1}},
        {"k": [1, 2]},
        {"k": None},
        {"k": math.inf},
        {"k": -math.inf},
        {"k": math.nan},
        "not a map",
        [("k", "v")],
    ],
    ids=[
        "65-entries",
        "long-key",
        "empty-key",
        "long-value",
        "nested-dict",
        "list-value",
        "null-value",
        "inf",
        "-inf",
        "nan",
        "string",
        "list",
    ],
)
def test_context_invalid_rejected(ctx) -> None:
    """Too many entries, oversized keys or values, nested values, null and non-finite: rejected."""
    assert_names(rejected(context=ctx), "context")


def test_context_integers_at_64_bit_limits_accepted() -> None:
    """The smallest and largest 64-bit integers are kept as integers and survive JSON encoding."""
    # Given a context at the limits of a signed 64-bit integer
    ev = InteractionData(**fields(context={"lo": INT64_MIN, "hi": INT64_MAX}))
    # Then they are kept, as ints, and the event encodes
    assert ev.context == {"lo": -(2**63), "hi": 2**63 - 1}
    assert all(type(v) is int for v in ev.context.values())
    assert orjson.loads(orjson.dumps(ev.model_dump(mode="json")))["context"] == ev.context


@pytest.mark.parametrize(
    "value", [2**63, -(2**63) - 1, 2**64, 10**400], ids=["2**63", "-2**63-1", "2**64", "10**400"]
)
def test_context_integer_beyond_64_bits_rejected(value) -> None:
    """An integer beyond 64 bits is refused naming the key (it is not turned into a float, and the
    client never reaches the encoder that cannot hold it)."""
    # When validated
    exc = rejected(context={"page": 1, "big": value})
    # Then the error names context.big and the 64-bit rule, never the value
    assert isinstance(exc, ValueError)
    text = describe_validation_error(exc)
    assert text.startswith("context.big:"), text
    assert "64 bits" in text
    assert str(value)[:12] not in text


# -- label ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("label", "expected"),
    [
        (0.0, [0.0]),
        (1.0, [1.0]),
        (0.5, [0.5]),
        (1, [1.0]),
        ([0.1], [0.1]),
        ([0.0, 1.0, 0.25], [0.0, 1.0, 0.25]),
        ([0.5] * 64, [0.5] * 64),
        (None, None),
    ],
)
def test_label_valid(label, expected) -> None:
    """A number in [0, 1], a list of 1 to 64 of them, or null."""
    # When validated
    ev = InteractionData(**fields(label=label))
    # Then ``labels()`` gives the floats
    assert ev.labels() == expected


@pytest.mark.parametrize(
    "label",
    [
        -0.01,
        1.01,
        math.nan,
        math.inf,
        "0.5",
        ["0.5"],
        [],
        [0.5, 1.5],
        [0.5, math.nan],
        [0.5] * 65,
        True,
        {"a": 0.5},
        [[0.5]],
    ],
    ids=[
        "below",
        "above",
        "nan",
        "inf",
        "string",
        "list-of-string",
        "empty-list",
        "list-out-of-range",
        "list-nan",
        "65-values",
        "bool",
        "dict",
        "nested-list",
    ],
)
def test_label_invalid_rejected(label) -> None:
    """Out of range, NaN, inf, strings, booleans, empty or oversized lists: rejected."""
    assert_names(rejected(label=label), "label")


# -- model and unknown fields ---------------------------------------------------------------------


def test_model_defaults_to_default() -> None:
    """Without ``model`` the event trains the model named 'default'."""
    assert InteractionData(**fields()).model == "default"


@pytest.mark.parametrize("model", ["m1", "shop.eu-west_2", "x" * 64])
def test_model_name_given_is_kept(model) -> None:
    """A model name is kept."""
    assert InteractionData(**fields(model=model)).model == model


@pytest.mark.parametrize("model", ["", "x" * 65, "has space", "a{b}", "a:b"])
def test_model_name_invalid_rejected(model) -> None:
    """Empty, too long, or characters that could break Redis key names: rejected."""
    assert_names(rejected(model=model), "model")


@pytest.mark.parametrize("name", ["labels", "userId", "extra"])
def test_unknown_fields_rejected(name) -> None:
    """Any field not in the contract is rejected, naming it."""
    assert_names(rejected(**{name: 1}), name)


# -- the wire format ------------------------------------------------------------------------------


def test_json_dump_round_trips() -> None:
    """``model_dump(mode="json")`` (the task argument) validates back to the same event."""
    # Given a full event
    ev = InteractionData(
        **fields(
            event_id="e-1",
            timestamp=datetime(2024, 3, 1, 10, 0, tzinfo=timezone(timedelta(hours=2))),
            context={"s": "x", "i": 1, "f": 0.5, "b": False},
            label=[0.2, 0.8],
            model="m1",
        )
    )
    # When dumped to JSON-compatible data and validated again
    data = ev.model_dump(mode="json")
    again = InteractionData.model_validate(data)
    # Then nothing changed
    assert again == ev
    assert isinstance(data["timestamp"], str)


def test_event_list_validates_each_event() -> None:
    """``EVENT_LIST`` validates a list in one call; an error names the index and the field."""
    # Given a list with one bad event
    items = [fields(), fields(user_id=""), fields()]
    # When validated
    with pytest.raises(pydantic.ValidationError) as info:
        EVENT_LIST.validate_python(items)
    # Then the error points at item 1's user_id
    assert [e["loc"][:2] for e in info.value.errors()] == [(1, "user_id")]


# -- describe_validation_error ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "field", "kind"),
    [
        ({"user_id": "SECRET" * 50}, "user_id", "str"),
        ({"action_type": "SECRET" * 20}, "action_type", "str"),
        ({"event_id": "SECRET" * 30}, "event_id", "str"),
        ({"context": {"page": "SECRET" * 50}}, "context.page", "str"),
        ({"label": "SECRET"}, "label", "str"),
        ({"timestamp": "SECRET"}, "timestamp", "str"),
        ({"model": "SECRET " * 20}, "model", "str"),
        ({"label": [0.5, 7.0]}, "label[1]", "float"),
        ({"context": {"k": {"a": 1}}}, "context.k", "dict"),
        ({"timestamp": True}, "timestamp", "bool"),
    ],
)
def test_describe_names_field_and_kind_never_the_value(overrides, field, kind) -> None:
    """The one-line summary names the field and the kind of value, never the value itself."""
    # Given an invalid event
    exc = rejected(**overrides)
    # When summarised
    text = describe_validation_error(exc)
    # Then it names the field and the value's type, on one line, without the raw value
    assert text.startswith(f"{field}:"), text
    assert kind in text
    assert "\n" not in text
    assert "SECRET" not in text


def test_describe_hides_oversized_context_key() -> None:
    """An oversized context key is a raw value too: the summary names 'context' but not the key."""
    # Given a context whose key is far too long
    exc = rejected(context={"SECRET" * 100: 1})
    # When summarised
    text = describe_validation_error(exc)
    # Then the key itself is not repeated, and the summary is short
    assert text.startswith("context"), text
    assert "SECRET" not in text
    assert len(text) < 300


def test_describe_folds_many_errors() -> None:
    """Beyond the limit, further fields are counted, not listed."""
    # Given an event wrong in six fields
    with pytest.raises(pydantic.ValidationError) as info:
        InteractionData(user_id="", action_type="", timestamp=-1, event_id="", model="", label=2.0)
    # When summarised with a limit of 3
    text = describe_validation_error(info.value, limit=3)
    # Then three fields are named and the rest counted
    assert text.count(":") == 3
    assert text.endswith("and 3 more")


# -- validation before publishing -----------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"user_id": "u1", "action_type": "click"},
        {"user_id": "u1", "action_type": "click", "timestamp": 0, "labels": 1.0},
        {"user_id": "u1", "action_type": "click", "timestamp": -5},
        {"user_id": "u1", "action_type": "click", "timestamp": 0, "label": 1.5},
        {"user_id": "u1", "action_type": "click", "timestamp": "0001-01-01T00:00:00+01:00"},
        {"user_id": "u1", "action_type": "click", "timestamp": 0, "context": {"n": 2**64}},
    ],
    ids=[
        "missing-timestamp",
        "unknown-field",
        "negative-timestamp",
        "label-out-of-range",
        "timestamp-before-year-1-utc",
        "context-int-beyond-64-bits",
    ],
)
def test_train_step_with_invalid_event_raises_and_enqueues_nothing(client, redis_client, bad) -> None:
    """``train_step`` validates first: an invalid dict raises ValidationError and sends nothing."""
    # Given the queue's length on the private Redis
    queue = client.settings.queue
    before = redis_client.llen(queue)
    # When an invalid event is published
    with pytest.raises(pydantic.ValidationError) as info:
        client.train_step(bad)
    # Then the error is a ValueError and the queue did not grow
    assert isinstance(info.value, ValueError)
    assert redis_client.llen(queue) == before


def test_train_many_with_one_invalid_event_enqueues_nothing(client, redis_client) -> None:
    """``train_many`` is all or nothing: one bad event and no message is sent."""
    # Given valid events and one invalid one
    events = [fields(event_id=f"ok-{i}") for i in range(5)] + [fields(user_id="")]
    before = redis_client.llen(client.settings.queue)
    # When they are published together
    with pytest.raises(pydantic.ValidationError):
        client.train_many(events)
    # Then nothing was enqueued
    assert redis_client.llen(client.settings.queue) == before


def test_predict_with_invalid_event_raises_and_enqueues_nothing(client, redis_client) -> None:
    """``predict`` validates before sending too."""
    # Given the queue's length
    before = redis_client.llen(client.settings.queue)
    # When an invalid event is sent for prediction
    with pytest.raises(pydantic.ValidationError):
        client.predict(fields(context={"k": [1]}))
    # Then nothing was enqueued
    assert redis_client.llen(client.settings.queue) == before
