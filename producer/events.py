"""The event every producer sends: ``InteractionData``, its rules and its JSON Schema."""

from __future__ import annotations

import math
from datetime import UTC, datetime
from typing import Annotated, Any, NotRequired

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    StrictBool,
    StrictFloat,
    StrictInt,
    StringConstraints,
    TypeAdapter,
    ValidationError,
    ValidatorFunctionWrapHandler,
    WrapValidator,
    with_config,
)
from typing_extensions import TypedDict

from producer.protocol import new_task_id

__all__ = [
    "CONTEXT_KEY_MAX",
    "CONTEXT_MAX_ENTRIES",
    "CONTEXT_VALUE_MAX",
    "INT64_MAX",
    "INT64_MIN",
    "EVENT_LIST",
    "LABEL_MAX_OUTPUTS",
    "MODEL_NAME_PATTERN",
    "InteractionData",
    "check_dict",
    "check_dicts",
    "describe_validation_error",
    "event_json_schema",
]

CONTEXT_MAX_ENTRIES = 64
CONTEXT_KEY_MAX = 64
CONTEXT_VALUE_MAX = 256
LABEL_MAX_OUTPUTS = 64
#: Model names: they become part of Redis key names and command-line arguments.
MODEL_NAME_PATTERN = r"^[A-Za-z0-9_.\-]{1,64}$"
#: Context integers are 64-bit signed: what JSON encoders (orjson too) and other languages hold.
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1
# Epoch seconds beyond year 9999 cannot be a real interaction time.
_MAX_EPOCH = 253_402_300_799.0


def _int64(value: Any) -> Any:
    # Checked before the union: a larger int would fail the int branch and pass the float one,
    # silently becoming a float; and orjson cannot encode it (TypeError in the client).
    if type(value) is int and not INT64_MIN <= value <= INT64_MAX:
        raise ValueError("integers must fit in 64 bits (-2**63 to 2**63-1)")
    return value


ContextKey = Annotated[str, StringConstraints(min_length=1, max_length=CONTEXT_KEY_MAX)]
ContextValue = Annotated[
    StrictBool
    | Annotated[StrictInt, Field(ge=INT64_MIN, le=INT64_MAX)]
    | Annotated[StrictFloat, Field(allow_inf_nan=False)]
    | Annotated[str, StringConstraints(max_length=CONTEXT_VALUE_MAX)],
    BeforeValidator(_int64),
]
Probability = Annotated[float, Field(strict=True, ge=0.0, le=1.0, allow_inf_nan=False)]


def _from_epoch(value: float) -> datetime:
    # Range first: math.isfinite overflows on an int beyond float range (10**400).
    if not (0 <= value <= _MAX_EPOCH and math.isfinite(value)):
        raise ValueError(f"timestamp {value!r} is not epoch seconds in [0, {_MAX_EPOCH:.0f}]")
    return datetime.fromtimestamp(value, tz=UTC)


def _utc(value: datetime) -> datetime:
    # Naive datetimes are UTC.
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    try:
        return value.astimezone(UTC)
    except OverflowError:
        # 0001-01-01T00:00+01:00 is in year 0 in UTC: no datetime can hold it.
        raise ValueError("out of range: in UTC it falls before 0001-01-01 or after 9999-12-31") from None


def _timestamp(value: Any, handler: ValidatorFunctionWrapHandler) -> datetime:
    # One Python call for the whole field (a before and an after validator cost twice that):
    # numbers are epoch seconds, always (pydantic would read large ones as milliseconds), a
    # number in a string too; anything else is pydantic's to parse; the result is in UTC.
    # First the common case, an int or float in range, by exact type (a third of the field's
    # cost went to the isinstance checks below); NaN fails the comparison and goes on.
    kind = type(value)
    if (kind is float or kind is int) and 0 <= value <= _MAX_EPOCH:
        return datetime.fromtimestamp(value, tz=UTC)
    return _timestamp_other(value, handler)


def _timestamp_checked(value: Any, handler: ValidatorFunctionWrapHandler) -> Any:
    # ``_timestamp`` for a check whose result is thrown away (``check_dicts``): an epoch number in
    # range is accepted as it is, since building its datetime cannot fail (0 to 9999-12-31).
    kind = type(value)
    if (kind is float or kind is int) and 0 <= value <= _MAX_EPOCH:
        return value
    return _timestamp_other(value, handler)


def _timestamp_other(value: Any, handler: ValidatorFunctionWrapHandler) -> datetime:
    if isinstance(value, bool):
        raise ValueError("timestamp must be a datetime or epoch seconds, not a boolean")
    if isinstance(value, int | float):
        return _from_epoch(value)
    if isinstance(value, str | bytes):
        try:
            number = float(value)
        except ValueError:
            pass  # an ISO 8601 string
        else:
            return _from_epoch(number)
    return _utc(handler(value))


# The field types, shared by the model and the producer's check of plain dicts (``check_dicts``),
# so that the two cannot disagree on what a valid event is.
EventId = Annotated[str, StringConstraints(min_length=1, max_length=128)]
UserId = Annotated[str, StringConstraints(min_length=1, max_length=256)]
ActionType = Annotated[str, StringConstraints(min_length=1, max_length=64)]
Timestamp = Annotated[datetime, WrapValidator(_timestamp)]
#: ``Timestamp`` for ``check_dicts``: accepts exactly the same values, builds no datetime.
CheckedTimestamp = Annotated[datetime, WrapValidator(_timestamp_checked)]
Context = Annotated[dict[ContextKey, ContextValue] | None, Field(max_length=CONTEXT_MAX_ENTRIES)]
Label = Probability | Annotated[list[Probability], Field(min_length=1, max_length=LABEL_MAX_OUTPUTS)] | None
ModelName = Annotated[str, StringConstraints(pattern=MODEL_NAME_PATTERN)]


class InteractionData(BaseModel):
    """One user interaction: who did what, when, in which context.

    >>> e = InteractionData(user_id="u1", action_type="click", timestamp=0)
    >>> e.timestamp.isoformat(), e.model
    ('1970-01-01T00:00:00+00:00', 'default')
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    event_id: EventId = Field(
        default_factory=new_task_id,
        description="De-duplication key; a UUID4 is generated when absent.",
    )
    user_id: UserId = Field(description="Who interacted; only its hash is ever stored.")
    action_type: ActionType = Field(description="What they did, e.g. click, view, purchase, dismiss.")
    timestamp: Timestamp = Field(description="When: an ISO 8601 datetime (naive means UTC) or epoch seconds.")
    context: Context = Field(
        default=None, description="Flat str -> str/int/float/bool map, at most 64 entries."
    )
    label: Label = Field(
        default=None,
        description="Explicit target in [0, 1], one per model output; overrides the action mapping.",
    )
    model: ModelName = Field(default="default", description="Which model the event trains.")

    def labels(self) -> list[float] | None:
        """The label as a list of floats (a scalar label is one output), or None."""
        if self.label is None:
            return None
        if isinstance(self.label, list):
            return [float(v) for v in self.label]
        return [float(self.label)]


#: Validates a list of events in one call (faster than one model call per event).
EVENT_LIST: TypeAdapter[list[InteractionData]] = TypeAdapter(list[InteractionData])


class _Dicts:
    """The event as a ``TypedDict`` of the model's field types: pydantic checks a plain dict
    against it without building a model, in about half the time. Named as the model, so that a
    ``ValidationError`` reads the same ("validation error for InteractionData")."""

    @with_config(ConfigDict(extra="forbid"))
    class InteractionData(TypedDict):
        event_id: NotRequired[EventId]
        user_id: UserId
        action_type: ActionType
        timestamp: CheckedTimestamp
        context: NotRequired[Context]
        label: NotRequired[Label]
        model: NotRequired[ModelName]


#: An epoch number in range, checked by pydantic without a call into Python.
_EpochSeconds = Annotated[float, Strict(), Field(ge=0, le=_MAX_EPOCH, allow_inf_nan=False)]


class _FastDicts:
    """``_Dicts`` with epoch numbers checked natively first: accepts exactly what ``_Dicts``
    accepts (anything else goes on to ``_Dicts``' own validator), but its errors tell of both
    alternatives; ``check_dicts`` reports those of ``_Dicts`` instead."""

    @with_config(ConfigDict(extra="forbid"))
    class InteractionData(TypedDict):
        event_id: NotRequired[EventId]
        user_id: UserId
        action_type: ActionType
        timestamp: Annotated[_EpochSeconds | CheckedTimestamp, Field(union_mode="left_to_right")]
        context: NotRequired[Context]
        label: NotRequired[Label]
        model: NotRequired[ModelName]


_DICT = TypeAdapter(_Dicts.InteractionData)
_DICT_LIST = TypeAdapter(list[_Dicts.InteractionData])
_FAST_DICT_LIST = TypeAdapter(list[_FastDicts.InteractionData])


def check_dict(event: dict[str, Any]) -> None:
    """Raise ``ValidationError`` exactly when ``InteractionData.model_validate(event)`` would."""
    _DICT.validate_python(event)


def check_dicts(events: list[dict[str, Any]]) -> None:
    """Raise ``ValidationError`` exactly when ``EVENT_LIST.validate_python(events)`` would."""
    try:
        _FAST_DICT_LIST.validate_python(events)
    except ValidationError:
        _DICT_LIST.validate_python(events)  # raises the model's own errors


def event_json_schema() -> dict[str, Any]:
    """The JSON Schema of one event, as ``itrain schema`` prints it."""
    return InteractionData.model_json_schema(mode="validation")


def describe_validation_error(exc: ValidationError, limit: int = 5) -> str:
    """A one-line summary naming each bad field and the kind of value it got (never the value).

    Values are left out on purpose: they may be huge (an oversized string) or a user id. The
    alternatives of a union field (a context value, the label) are folded into one line.
    """
    lines: dict[str, str] = {}
    for err in exc.errors(include_url=False):
        if err["type"] == "invalid_event":
            # An InvalidEventError made from a text (a worker's): the text says it all.
            lines.setdefault(err["msg"], "")
            continue
        loc = [str(p) for p in err["loc"]]
        kind = type(err.get("input")).__name__
        if loc[:1] == ["context"] and len(loc) >= 3 and loc[2] == "[key]":
            field = "context"
            msg = f"keys must be strings of 1 to {CONTEXT_KEY_MAX} characters; got one of {len(loc[1])}"
        elif loc[:1] == ["context"] and len(loc) == 2:
            # An error of the whole value (an integer beyond 64 bits), before its kinds are tried.
            field = ".".join(loc) if len(loc[1]) <= CONTEXT_KEY_MAX else "context"
            msg = f"{_plain(err['msg'])} (got {kind})"
        elif loc[:1] == ["context"] and len(loc) >= 3:
            field = ".".join(loc[:2]) if len(loc[1]) <= CONTEXT_KEY_MAX else "context"
            msg = (
                f"must be a string of at most {CONTEXT_VALUE_MAX} characters, a 64-bit integer, "
                f"a finite float or a boolean; got {kind}"
            )
        elif loc[:1] == ["label"] and len(loc) >= 3:
            field = f"label[{loc[2]}]"
            msg = f"{err['msg']} (got {kind})"
        elif loc[:1] == ["label"] and len(loc) == 2:
            if loc[1].startswith("list[") != (kind == "list"):
                continue  # the other branch's error says it better
            field = "label"
            msg = f"must be a number in [0, 1] or a list of them: {err['msg']} (got {kind})"
        else:
            field = ".".join(loc) or "event"
            msg = f"{_plain(err['msg'])} (got {kind})"
        lines.setdefault(field, msg)
    parts = [f"{field}: {msg}" if msg else field for field, msg in list(lines.items())[:limit]]
    if len(lines) > limit:
        parts.append(f"and {len(lines) - limit} more")
    return "; ".join(parts)


def _plain(msg: str) -> str:
    # pydantic prefixes the text of a ValueError raised by a validator with "Value error, ".
    return msg.removeprefix("Value error, ")
