"""The project's errors: one base class, a shallow tree, a message that names the cause."""

from __future__ import annotations

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
    "ModelError",
    "ModelExistsError",
    "ModelNotInitialisedError",
    "NonFiniteUpdateError",
    "PermissionDeniedError",
    "PublishError",
    "QueueFullError",
    "ResultIgnoredError",
    "ResultTimeoutError",
    "TargetError",
]


class ItrainError(Exception):
    """Base class of every error interaction-trainer raises."""


class ConfigurationError(ItrainError):
    """A setting has a value the project cannot work with."""


class PermissionDeniedError(ConfigurationError):
    """The Redis user lacks a right the call needs (``NOPERM``): a setup error, not an outage;
    retrying cannot help. ``itrain acl`` prints the rights of each role."""


class PublishError(ItrainError):
    """An event could not be handed to the broker (Redis unreachable or too slow)."""


class QueueFullError(PublishError):
    """The queue is longer than ``ITRAIN_MAX_QUEUE_LENGTH``; nothing was enqueued."""


class BrokerFullError(QueueFullError):
    """Redis refused the message because it is out of memory (``OOM`` under ``noeviction``);
    nothing was enqueued. Slow down and retry, or give Redis more memory."""


class ModelError(ItrainError):
    """Something is wrong with a model's state in the store."""


class ModelNotInitialisedError(ModelError):
    """The named model has no checkpoint yet (run ``itrain init``)."""


class ModelExistsError(ModelError):
    """``itrain init`` without ``--force`` on a model that already has a checkpoint."""


class CheckpointError(ModelError):
    """A stored checkpoint is unreadable (bad shape, dtype or size)."""


class InvalidEventError(ItrainError, ValueError):
    """A message that reached a worker is not a valid event (bad JSON, type or field)."""

    #: What could still be read of a message that failed to decode (to route its dead letter).
    payload_hint: object = None


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


class LockTimeoutError(ItrainError):
    """The model's lock could not be had within the bounded wait, after every retry."""


class ResultIgnoredError(ItrainError, ValueError):
    """Results were asked for jobs sent with ``result=False``/``results=False``: none will ever
    be written, so waiting for them would never end."""


class ResultTimeoutError(ItrainError, TimeoutError):
    """Job results were not all ready within the time the caller allowed."""
