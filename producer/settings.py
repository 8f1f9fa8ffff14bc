"""One settings object, read from ``ITRAIN_*`` environment variables (pydantic-settings)."""

from __future__ import annotations

from functools import lru_cache

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

__all__ = ["DEFAULT_TARGETS", "Settings", "get_settings"]

#: Target for each action type when an event carries no ``label``. An action that is in neither
#: this mapping nor has a label is rejected: the engine never trains on a made-up value.
DEFAULT_TARGETS: dict[str, float] = {
    "purchase": 1.0,
    "click": 1.0,
    "like": 1.0,
    "share": 1.0,
    "view": 0.5,
    "dismiss": 0.0,
    "skip": 0.0,
}


class Settings(BaseSettings):
    """Every knob of the system; each is also the environment variable ``ITRAIN_<NAME>``."""

    model_config = SettingsConfigDict(env_prefix="ITRAIN_", extra="ignore", frozen=True)

    # Where things live.
    redis_url: str = "redis://localhost:6379/0"
    broker_url: str | None = None
    result_backend: str | None = None
    store_url: str | None = None
    queue: str = Field("itrain", min_length=1, max_length=200)

    # The lock and the delivery guarantees (seconds).
    lock_timeout: float = Field(5.0, gt=0)
    lock_wait: float = Field(2.0, gt=0)
    lock_poll: float = Field(0.001, gt=0)
    lock_retries: int = Field(3, ge=0)
    visibility_timeout: int = Field(300, gt=0)
    # A job handle is waited on for seconds or minutes: an hour covers that with room, and bounds
    # what results cost Redis (about 490 bytes each: 1.8 MB per sustained event/s).
    result_expires: int = Field(3600, gt=0)
    # The de-duplication window: an event id trained within it answers ``duplicate``.
    dedupe_ttl: int = Field(3600, gt=0)
    commit_retries: int = Field(20, ge=1)
    #: A message handed out more often than this is dead-lettered instead of trained (its events
    #: already in the weights answer ``duplicate``): a message that keeps killing or stalling its
    #: worker stops coming back.
    max_deliveries: int = Field(5, ge=1)

    # Publishing.
    publish_timeout: float = Field(5.0, gt=0)
    max_queue_length: int = Field(0, ge=0)
    chunk_size: int = Field(256, ge=1, le=10_000)

    # Worker-side micro-batching.
    #: Events per pool job (one lock): a train_step message is one, a train_batch one chunk_size.
    batch_max: int = Field(1024, ge=1, le=10_000)
    batch_wait_ms: float = Field(10.0, ge=0)
    prefetch_multiplier: int = Field(128, ge=1)
    # Messages a worker takes from the queue in one round trip at most.
    fetch_max: int = Field(50, ge=1, le=1000)
    worker_concurrency: int | None = Field(None, ge=1)

    # Bookkeeping and bounded memory.
    history_max: int = Field(1000, ge=1)
    dead_letter_max: int = Field(1000, ge=1)
    log_every: int = Field(10, ge=1)
    loss_ema_alpha: float = Field(0.05, gt=0, le=1)
    targets: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_TARGETS))
    # Lock wait and hold times per batch into itrain:{m}:timings (for `itrain bench`).
    record_timings: bool = False

    # Limits enforced before any training.
    max_message_bytes: int = Field(1_048_576, ge=1024)

    @model_validator(mode="after")
    def _check(self) -> Settings:
        for action, value in self.targets.items():
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"ITRAIN_TARGETS[{action!r}] = {value} is outside [0, 1]")
        # Every redelivery of a message comes within (deliveries allowed + 1) visibility timeouts
        # of its first delivery: the markers must outlive all of them.
        floor = (self.max_deliveries + 1) * self.visibility_timeout
        if self.dedupe_ttl < floor:
            raise ValueError(
                f"ITRAIN_DEDUPE_TTL={self.dedupe_ttl} must be at least (ITRAIN_MAX_DELIVERIES + 1) x "
                f"ITRAIN_VISIBILITY_TIMEOUT = {floor} s, or a redelivered event could be trained twice"
            )
        if self.lock_timeout <= self.lock_poll:
            raise ValueError("ITRAIN_LOCK_TIMEOUT must be longer than ITRAIN_LOCK_POLL")
        return self

    @property
    def broker(self) -> str:
        return self.broker_url or self.redis_url

    @property
    def backend(self) -> str:
        return self.result_backend or self.redis_url

    @property
    def store(self) -> str:
        return self.store_url or self.redis_url


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once from the environment."""
    return Settings()
