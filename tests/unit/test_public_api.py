"""The public API: every error a caller can meet is exported by ``producer``, and the errors keep
the classes callers already catch (``pydantic.ValidationError``, Celery's ``TimeoutError``)."""

from __future__ import annotations

import inspect
import pickle
from typing import Any

import pytest
from celery import Celery
from celery.exceptions import TimeoutError as CeleryTimeoutError
from pydantic import BaseModel, ValidationError, field_validator
from pydantic_core import PydanticCustomError

import producer
from producer import errors
from producer.errors import InvalidEventError, ItrainError, ResultTimeoutError
from producer.events import InteractionData, describe_validation_error
from producer.outgoing import event_json, payloads

EVENT = {"user_id": "u1", "action_type": "click", "timestamp": 1_700_000_000}


def test_every_error_of_the_project_is_exported_by_producer() -> None:
    # Given every error class the project defines (the client raises them, handle.get() re-raises
    # the workers' ones by name from producer.errors)
    defined = {
        name
        for name, obj in vars(errors).items()
        if inspect.isclass(obj) and issubclass(obj, ItrainError) and obj.__module__ == errors.__name__
    }
    # Then each is in producer.__all__, as the same class
    assert defined - set(producer.__all__) == set()
    assert all(getattr(producer, name) is getattr(errors, name) for name in defined)
    assert set(errors.__all__) == defined


def test_an_invalid_event_is_our_error_and_pydantics() -> None:
    # When an event with two bad fields is validated by the clients' shared code
    with pytest.raises(InvalidEventError) as info:
        event_json({**EVENT, "user_id": "", "timestamp": "not a time"})
    exc = info.value
    # Then it is our error, pydantic's, and a ValueError, with pydantic's field-level details
    assert isinstance(exc, ItrainError)
    assert isinstance(exc, ValidationError)
    assert isinstance(exc, ValueError)
    assert {e["loc"] for e in exc.errors()} == {("user_id",), ("timestamp",)}
    assert exc.error_count() == 2
    assert "2 validation errors for InteractionData" in str(exc)
    assert "user_id" in str(exc)
    # And train_many's path raises it too, naming the event's index
    with pytest.raises(InvalidEventError, match=r"1\.timestamp") as many:
        payloads([EVENT, {**EVENT, "timestamp": -1}])
    assert [e["loc"] for e in many.value.errors()] == [(1, "timestamp")]


def test_an_invalid_event_error_survives_pickle_and_celerys_result_form() -> None:
    # A worker's error, made from its text, as Celery stores it and rebuilds it on the caller
    worker_side = InvalidEventError("invalid event: timestamp: out of range (got str)")
    assert str(worker_side) == "invalid event: timestamp: out of range (got str)"
    assert worker_side.errors()[0]["msg"] == str(worker_side)
    stored = {
        "exc_type": "InvalidEventError",
        "exc_message": list(worker_side.args),
        "exc_module": "producer.errors",
    }
    app = Celery("itrain-test", set_as_current=False)
    rebuilt = app.backend.exception_to_python(stored)
    app.close()
    assert type(rebuilt) is InvalidEventError
    assert str(rebuilt) == str(worker_side)
    # Both forms cross a process boundary whole (the pool pickles errors)
    worker_side.payload_hint = {"model": "m"}
    again = pickle.loads(pickle.dumps(worker_side))
    assert (str(again), again.payload_hint) == (str(worker_side), {"model": "m"})
    with pytest.raises(InvalidEventError) as info:
        event_json({**EVENT, "action_type": ""})
    detailed = pickle.loads(pickle.dumps(info.value))
    assert detailed.errors() == info.value.errors()


def test_result_timeout_is_ours_celerys_and_pythons() -> None:
    assert issubclass(ResultTimeoutError, ItrainError)
    assert issubclass(ResultTimeoutError, CeleryTimeoutError)
    assert issubclass(ResultTimeoutError, TimeoutError)


def test_a_workers_invalid_event_error_is_described_by_its_text() -> None:
    # The command line describes every ValidationError in one line; a worker's error (rebuilt
    # from its text) reads as that text, without a made-up field or value kind
    worker_side = InvalidEventError("invalid event: timestamp: out of range (got str)")
    assert describe_validation_error(worker_side) == "invalid event: timestamp: out of range (got str)"


def test_invalid_event_error_keeps_every_detail_of_pydantics_error() -> None:
    # Given pydantic's own error for an event with several bad fields
    bad = {**EVENT, "user_id": "", "timestamp": True, "label": 3, "context": {"k": 2**70}, "x": 1}
    with pytest.raises(ValidationError) as original:
        InteractionData.model_validate(bad)
    # Then ours, from the clients, holds the same errors and message
    with pytest.raises(InvalidEventError) as ours:
        event_json(bad)
    assert _comparable(ours.value.errors()) == _comparable(original.value.errors())
    assert str(ours.value) == str(original.value)


def _comparable(errors: list[Any]) -> list[Any]:
    # A ctx may hold the ValueError a validator raised: equal by its text, not by identity
    return [{**e, "ctx": {k: str(v) for k, v in e.get("ctx", {}).items()}} for e in errors]


def test_invalid_event_error_keeps_a_validators_own_error_type() -> None:
    # A type pydantic does not know by name keeps its type and message; the others stay whole
    class Model(BaseModel):
        a: int
        b: int

        @field_validator("a")
        @classmethod
        def custom(cls, v: int) -> int:
            raise PydanticCustomError("my_type", "custom {x}", {"x": 1})

        @field_validator("b")
        @classmethod
        def plain(cls, v: int) -> int:
            raise ValueError("bad b")

    with pytest.raises(ValidationError) as original:
        Model(a=1, b=2)
    ours = InvalidEventError.from_validation_error(original.value)
    assert [(e["type"], e["loc"], e["msg"]) for e in ours.errors()] == [
        ("my_type", ("a",), "custom 1"),
        ("value_error", ("b",), "Value error, bad b"),
    ]
    assert _comparable(ours.errors())[1] == _comparable(original.value.errors())[1]
