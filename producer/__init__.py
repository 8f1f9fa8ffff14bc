"""interaction-trainer's producer side: the event, the client, settings and errors (no numpy)."""

from producer.async_client import AsyncTrainingClient
from producer.client import EventLike, TrainingClient
from producer.errors import (
    BrokerFullError,
    CheckpointError,
    ConfigurationError,
    DeliveryExpiredError,
    DeliveryLimitError,
    EventProcessingError,
    GuardTrippedError,
    InvalidEventError,
    ItrainError,
    LockTimeoutError,
    MessageFormatError,
    ModelError,
    ModelExistsError,
    ModelNotInitialisedError,
    NonFiniteUpdateError,
    PermissionDeniedError,
    PublishError,
    QueueFullError,
    QueueNameError,
    ReplicationError,
    ResultIgnoredError,
    ResultTimeoutError,
    ServerVersionError,
    StoreLayoutError,
    TargetError,
)
from producer.events import InteractionData, event_json_schema
from producer.model_reader import ModelReader
from producer.protocol import TASK_PREDICT, TASK_TRAIN_BATCH, TASK_TRAIN_STEP
from producer.settings import Settings, get_settings

__all__ = [
    # The event, the client and the in-process reader
    "InteractionData",
    "EventLike",
    "TrainingClient",
    "AsyncTrainingClient",
    "ModelReader",
    "event_json_schema",
    # Configuration
    "Settings",
    "get_settings",
    # Task names
    "TASK_TRAIN_STEP",
    "TASK_TRAIN_BATCH",
    "TASK_PREDICT",
    # Errors: every one a caller can meet (a test holds this list to producer.errors)
    "ItrainError",
    "ConfigurationError",
    "PermissionDeniedError",
    "QueueNameError",
    "ServerVersionError",
    "StoreLayoutError",
    "PublishError",
    "BrokerFullError",
    "QueueFullError",
    "ReplicationError",
    "ModelError",
    "ModelNotInitialisedError",
    "ModelExistsError",
    "CheckpointError",
    "GuardTrippedError",
    "InvalidEventError",
    "TargetError",
    "NonFiniteUpdateError",
    "EventProcessingError",
    "DeliveryLimitError",
    "DeliveryExpiredError",
    "LockTimeoutError",
    "MessageFormatError",
    "ResultIgnoredError",
    "ResultTimeoutError",
]
