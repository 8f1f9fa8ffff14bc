"""The project's errors: one base class, a shallow tree, a message that names the cause."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from celery.exceptions import TimeoutError as CeleryTimeoutError
from pydantic import ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

__all__ = [
    "BrokerFullError",
    "CheckpointError",
    "ConfigurationError",
    "DeliveryExpiredError",
    "DeliveryLimitError",
    "EventProcessingError",
    "GuardTrippedError",
    "InvalidEventError",
    "ItrainError",
    "LockTimeoutError",
    "MessageFormatError",
    "ModelError",
    "ModelExistsError",
    "ModelNotInitialisedError",
    "NonFiniteUpdateError",
    "PermissionDeniedError",
    "PublishError",
    "QueueFullError",
    "QueueNameError",
    "ReplicationError",
    "ResultIgnoredError",
    "ResultTimeoutError",
    "ServerVersionError",
    "StoreLayoutError",
    "TargetError",
]


class ItrainError(Exception):
    """Base class of every error interaction-trainer raises."""


class ConfigurationError(ItrainError):
    """A setting has a value the project cannot work with."""


class PermissionDeniedError(ConfigurationError):
    """The Redis user lacks a right the call needs (``NOPERM``): a setup error, not an outage;
    retrying cannot help. ``itrain acl`` prints the rights of each role."""


class QueueNameError(ConfigurationError):
    """A queue name a model cannot be routed to: the default queue, or ``<ITRAIN_QUEUE>.<suffix>``
    with a suffix of ``A-Z a-z 0-9 _ -``, are the names one ACL pattern covers."""


class ServerVersionError(ConfigurationError):
    """The Redis server is older than the project needs (Redis 7.0, or Valkey 7.2)."""


class StoreLayoutError(ConfigurationError):
    """The store's layout (``itrain:layout``) is newer than this release reads, or unreadable:
    upgrade interaction-trainer (a worker refuses to start on it)."""


class PublishError(ItrainError):
    """An event could not be handed to the broker (Redis unreachable or too slow)."""


class QueueFullError(PublishError):
    """The queue is longer than ``ITRAIN_MAX_QUEUE_LENGTH``; nothing was enqueued."""


class BrokerFullError(QueueFullError):
    """Redis refused the message because it is out of memory (``OOM`` under ``noeviction``);
    nothing was enqueued. Slow down and retry, or give Redis more memory."""


class ReplicationError(PublishError):
    """Fewer replicas than ``ITRAIN_MIN_REPLICAS`` acknowledged a push within
    ``ITRAIN_REPLICA_TIMEOUT_MS``. The messages are on the master, and are likely to train; a
    failover now could lose them. ``event_ids`` names the events concerned: sending them again is
    safe (an event already trained answers ``duplicate``)."""

    def __init__(self, message: str, *, wanted: int = 0, got: int = 0, event_ids: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.wanted = wanted
        self.got = got
        self.event_ids: list[str] = list(event_ids)

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only fields: rebuilt from the message, then the attributes.
        return (type(self), (str(self),), self.__dict__)


class ModelError(ItrainError):
    """Something is wrong with a model's state in the store."""


class ModelNotInitialisedError(ModelError):
    """The named model has no checkpoint yet (run ``itrain init``)."""


class ModelExistsError(ModelError):
    """``itrain init`` without ``--force`` on a model that already has a checkpoint."""


class CheckpointError(ModelError):
    """A stored checkpoint is unreadable (bad shape, dtype or size)."""


class InvalidEventError(ItrainError, ValidationError):
    """An event is not valid: refused by a client before anything is sent, or by a worker that
    received it (bad JSON, type or field).

    Also a ``pydantic.ValidationError`` (so a ``ValueError``): ``except ValidationError`` clauses
    written for pydantic's own error still match, and ``errors()`` lists the bad fields. The
    clients raise it with pydantic's field-level details (``from_validation_error``); an error
    made from a text alone (``InvalidEventError("timestamp: ...")``: a worker's, or one read back
    from a job's result) reads as that text, and ``errors()`` holds one ``invalid_event`` entry.
    """

    #: What could still be read of a message that failed to decode (to route its dead letter).
    payload_hint: object = None
    #: The text of an error made from a text alone; None for one with pydantic's details.
    _text: str | None = None

    # pydantic-core's ValidationError is built by ``from_exception_data(title, line_errors,
    # input_type, hide_input)``, which calls the class with those four arguments; Celery and
    # pickle rebuild an error from its one-text ``args``. ``__new__`` tells the two apart.
    def __new__(cls, message: Any = "invalid event", *details: Any) -> InvalidEventError:
        if details:
            return super().__new__(cls, message, *details)
        text = str(message)
        # Without a context, pydantic leaves the template as it is ({...} in it included).
        line: InitErrorDetails = {
            "type": PydanticCustomError("invalid_event", text),
            "loc": (),
            "input": None,
        }
        error = cls.from_exception_data(_TITLE, [line])
        error._text = text
        return error

    def __init__(self, message: Any = "invalid event", *details: Any) -> None:
        # Celery stores ``args`` as the failure's message, and rebuilds the error from them.
        self.args = (self._text if self._text is not None else super().__str__(),)

    @classmethod
    def from_validation_error(cls, exc: ValidationError) -> InvalidEventError:
        """``exc`` as an ``InvalidEventError``: the same title, field errors and message."""
        return cls.from_exception_data(exc.title, [_line(err) for err in exc.errors(include_url=False)])

    def __str__(self) -> str:
        return self._text if self._text is not None else super().__str__()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({str(self)!r})"

    def __reduce__(self) -> tuple[Any, ...]:
        # With its attributes (``payload_hint``); from its text, or from its field errors.
        if self._text is not None:
            return (type(self), (self._text,), self.__dict__)
        return (*super().__reduce__()[:2], self.__dict__)


_TITLE = "InteractionData"


def _line(err: Any) -> InitErrorDetails:
    """One entry of ``ValidationError.errors()`` as a line to build an error from again."""
    line: InitErrorDetails = {"type": err["type"], "loc": err["loc"], "input": err["input"]}
    if "ctx" in err:
        line["ctx"] = err["ctx"]
    try:
        ValidationError.from_exception_data(_TITLE, [line])
    except (KeyError, TypeError, ValueError):
        # A type pydantic does not know by name (a validator's own PydanticCustomError): the
        # line keeps its type and its message as rendered.
        return {
            "type": PydanticCustomError(err["type"], err["msg"]),
            "loc": err["loc"],
            "input": err["input"],
        }
    return line


class TargetError(InvalidEventError):
    """No training target can be made for an event (unknown action and no label, bad label)."""


class NonFiniteUpdateError(ItrainError):
    """An update would have put a non-finite value (NaN or infinity) into the weights."""


class GuardTrippedError(ModelError):
    """The model's guard tripped: training on it is paused (its weights were rolled back to the
    best recent snapshot) until ``itrain resume``; the event was not trained and may be sent again
    after the resume (its event id keeps that safe)."""


class EventProcessingError(ItrainError):
    """The worker failed on one event in a way no rule names (a bug or a limit of a library); the
    event was set aside with a dead letter so that it cannot block its neighbours."""


class DeliveryLimitError(ItrainError):
    """A message was delivered more often than ``ITRAIN_MAX_DELIVERIES``; its events that were not
    yet trained were dead-lettered instead of tried again."""


class DeliveryExpiredError(DeliveryLimitError):
    """A message was still coming back (given back after Redis faults or restarts) when it was
    older than its events' de-duplication markers are sure to live (``ITRAIN_DEDUPE_TTL`` minus
    ``ITRAIN_VISIBILITY_TIMEOUT``, from when it was first taken): its events that were not yet
    trained were dead-lettered rather than trained where a marker could no longer stop a second
    training."""


class MessageFormatError(ItrainError):
    """A task message's format (its ``itrain_format`` header) is newer than the worker reads, or
    unreadable: the message was refused whole, with a dead letter, and nothing of it trained.
    Roll the workers to the new release first; the message may then be sent again."""


class LockTimeoutError(ItrainError):
    """The model's lock could not be had within the bounded wait, after every retry."""


class ResultIgnoredError(ItrainError, ValueError):
    """Results were asked for jobs sent with ``result=False``/``results=False``: none will ever
    be written, so waiting for them would never end."""


class ResultTimeoutError(ItrainError, CeleryTimeoutError, TimeoutError):  # type: ignore[misc]
    """Job results were not ready within the time the caller allowed (``handle.get(timeout=)``,
    ``wait``, ``wait_all``). Also Celery's ``TimeoutError`` (what ``AsyncResult.get()`` raises)
    and Python's (what ``wait_all`` raised before), so clauses catching either still match."""
