"""One settings object, read from ``ITRAIN_*`` environment variables (pydantic-settings)."""

from __future__ import annotations

from functools import lru_cache
from hashlib import blake2b
from pathlib import Path

from pydantic import Field, SecretStr, ValidationInfo, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from producer.errors import ConfigurationError
from producer.sentinel import complete_url
from producer.tls import check_tls_url

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
    #: The queues a worker consumes, comma-separated (empty: ``queue`` alone); see ``queue_names``.
    queues: str = ""
    # Seconds a client routes from its copy of ``itrain:routes`` before reading it again
    # (``producer.routes``): a route change reaches every producer within this time.
    routes_ttl: float = Field(5.0, ge=0)
    # A sentinel:// URL's master group (unless the URL says ?master_name=) and the sentinels' login.
    sentinel_master: str | None = None
    sentinel_username: str | None = None
    sentinel_password: SecretStr | None = None

    # The lock and the delivery guarantees (seconds).
    lock_timeout: float = Field(5.0, gt=0)
    lock_wait: float = Field(2.0, gt=0)
    lock_poll: float = Field(0.001, gt=0)
    lock_retries: int = Field(3, ge=0)
    visibility_timeout: int = Field(300, gt=0)
    # A job handle is waited on for seconds or minutes. 30 minutes is also the redelivery window at
    # the defaults, (ITRAIN_MAX_DELIVERIES + 1) x ITRAIN_VISIBILITY_TIMEOUT: a result outlives every
    # redelivery of its message, so a late redelivery never answers an event whose result is gone.
    # Results cost Redis ~300 bytes each (~70 per event in a train_many chunk's one result): at
    # 1,800 s, 0.54 MB per sustained event/s of train_step.
    result_expires: int = Field(1800, gt=0)
    # The de-duplication window: an event id trained within it answers ``duplicate``.
    dedupe_ttl: int = Field(3600, gt=0)
    commit_retries: int = Field(20, ge=1)
    #: A message handed out more often than this is dead-lettered instead of trained (its events
    #: already in the weights answer ``duplicate``): a message that keeps killing or stalling its
    #: worker stops coming back.
    max_deliveries: int = Field(5, ge=1)
    #: Ceiling of the back-off before a message that met a Redis fault goes back to the queue
    #: (0.5 s, doubling with each consecutive fault). The effective ceiling is at most half of
    #: ``visibility_timeout`` (``requeue_ceiling``): a message held longer would be taken for lost.
    requeue_backoff_max: float = Field(30.0, gt=0)

    # Publishing.
    publish_timeout: float = Field(5.0, gt=0)
    max_queue_length: int = Field(0, ge=0)
    chunk_size: int = Field(256, ge=1, le=10_000)
    # Replicas that must hold a push (WAIT) before a publishing call returns, and a worker's
    # commit and results on a Redis other than the broker before it acks (0: nobody waits).
    min_replicas: int = Field(0, ge=0)
    replica_timeout_ms: int = Field(1000, ge=1)

    # Worker-side micro-batching.
    #: Events per pool job (one lock): a train_step message is one, a train_batch one chunk_size.
    batch_max: int = Field(1024, ge=1, le=10_000)
    batch_wait_ms: float = Field(10.0, ge=0)
    #: Where that wait happens: before the fetch, and only while messages come fast enough to
    #: gather a few in it (``worker.consume.fetch_window``); off: every message taken at once and
    #: then held for the wait in the worker (the former rule).
    batch_wait_adaptive: bool = True
    #: Each pool process fetches, trains and acknowledges its own messages, with the main
    #: process out of the message path (``worker.consume.pool_fetch``; prefork workers on one
    #: queue). Off: the main process fetches and hands the pool jobs.
    pool_fetch: bool = False
    prefetch_multiplier: int = Field(128, ge=1)
    # Messages a worker takes from the queue in one round trip at most.
    fetch_max: int = Field(50, ge=1, le=1000)
    # Bytes one queue gives in that round trip at most (one message at least): the fetch script
    # and the worker's reading of what it took both hold up the other queues for as long.
    fetch_bytes: int = Field(131_072, ge=1)
    worker_concurrency: int | None = Field(None, ge=1)

    # The secret key of the user-id hash (a feature): without it, a stored feature can be reversed
    # with a dictionary of likely user ids. Every worker and in-process reader must share it.
    hash_key: SecretStr | None = None

    # Bookkeeping and bounded memory.
    history_max: int = Field(1000, ge=1)
    # A snapshot of the checkpoint every this many steps (0: never), the last this many kept.
    snapshot_every: int = Field(10_000, ge=0)
    snapshot_keep: int = Field(10, ge=1, le=1000)
    # The online evaluation's window: its metrics cover a model's last this many trained events
    # (fixed for a model when it first trains; a guard with a wider window widens it).
    eval_window: int = Field(1000, ge=1, le=100_000)
    dead_letter_max: int = Field(1000, ge=1)
    log_every: int = Field(10, ge=1)
    loss_ema_alpha: float = Field(0.05, gt=0, le=1)
    targets: dict[str, float] = Field(default_factory=lambda: dict(DEFAULT_TARGETS))
    # Lock wait and hold times per batch into itrain:{m}:timings (for `itrain bench`).
    record_timings: bool = False

    # Limits enforced before any training.
    max_message_bytes: int = Field(1_048_576, ge=1024)

    # `itrain exporter`: basic auth when a password is set, TLS when a certificate and its key are.
    # From the environment or files only, never flags: a flag shows in `ps` to every user of the host.
    exporter_user: str = Field("prometheus", min_length=1, pattern=r"^[^:]+$")
    exporter_password: SecretStr | None = None
    exporter_password_file: Path | None = None
    exporter_tls_cert: Path | None = None
    exporter_tls_key: Path | None = None

    @field_validator("redis_url", "broker_url", "result_backend", "store_url")
    @classmethod
    def _tls(cls, url: str | None, info: ValidationInfo) -> str | None:
        # A rediss:// URL must say how the server is verified (see ``check_tls_url``).
        try:
            return None if url is None else check_tls_url(url, f"ITRAIN_{str(info.field_name).upper()}")
        except ConfigurationError as exc:
            raise ValueError(str(exc)) from None

    @model_validator(mode="after")
    def _check(self) -> Settings:
        for field in ("redis_url", "broker_url", "result_backend", "store_url"):
            url = getattr(self, field)
            if url is not None:
                try:
                    self.complete(url, f"ITRAIN_{field.upper()}")
                except ConfigurationError as exc:
                    raise ValueError(str(exc)) from None
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
        if self.min_replicas and self.replica_timeout_ms >= self.publish_timeout * 1000:
            # WAIT answers only after its timeout when replicas are missing: the socket, timed by
            # ITRAIN_PUBLISH_TIMEOUT, would give up first and the push would be sent again.
            raise ValueError(
                f"ITRAIN_REPLICA_TIMEOUT_MS={self.replica_timeout_ms} must be shorter than "
                f"ITRAIN_PUBLISH_TIMEOUT={self.publish_timeout:g} s"
            )
        if self.exporter_password is not None and self.exporter_password_file is not None:
            raise ValueError(
                "set one of ITRAIN_EXPORTER_PASSWORD and ITRAIN_EXPORTER_PASSWORD_FILE, not both"
            )
        if (self.exporter_tls_cert is None) != (self.exporter_tls_key is None):
            raise ValueError(
                "ITRAIN_EXPORTER_TLS_CERT and ITRAIN_EXPORTER_TLS_KEY go together: set both or neither"
            )
        if self.lock_timeout <= self.lock_poll:
            raise ValueError("ITRAIN_LOCK_TIMEOUT must be longer than ITRAIN_LOCK_POLL")
        return self

    @property
    def hash_key_bytes(self) -> bytes:
        """The blake2b key derived from ``ITRAIN_HASH_KEY`` (any length), or b"" (unkeyed)."""
        if self.hash_key is None or not self.hash_key.get_secret_value():
            return b""
        secret = self.hash_key.get_secret_value().encode()
        return blake2b(secret, digest_size=32, person=b"itrain-hashkey").digest()

    def complete(self, url: str, name: str) -> str:
        """``url`` as the settings make it (``producer.sentinel.complete_url``): a sentinel URL
        names its master and the sentinels' login; ``ConfigurationError`` when it cannot."""
        password = self.sentinel_password.get_secret_value() if self.sentinel_password else None
        return _complete_url(url, name, self.sentinel_master, self.sentinel_username, password or None)

    # Each role's URL; a sentinel URL carries its master's name and the sentinels' login, so
    # that every component connects from the URL alone (``producer.redis_conn.connect``).

    @property
    def queue_names(self) -> list[str]:
        """The queues of ``ITRAIN_QUEUES`` in order, without blanks or repeats; ``[ITRAIN_QUEUE]``
        when it names none."""
        names = [q.strip() for q in self.queues.split(",")]
        return list(dict.fromkeys(q for q in names if q)) or [self.queue]

    @property
    def requeue_ceiling(self) -> float:
        """The longest back-off, seconds, before a message that met a Redis fault is given back."""
        return min(self.requeue_backoff_max, self.visibility_timeout / 2)

    @property
    def expire_after(self) -> float:
        """Seconds after a message was first taken from the queue beyond which it is no longer
        trained: a delivery may run up to ``visibility_timeout`` before it commits, and its event
        markers must still be there for the commit to see them (they live ``dedupe_ttl``)."""
        return float(self.dedupe_ttl - self.visibility_timeout)

    @property
    def broker(self) -> str:
        return self.complete(self.broker_url or self.redis_url, "ITRAIN_BROKER_URL")

    @property
    def backend(self) -> str:
        return self.complete(self.result_backend or self.redis_url, "ITRAIN_RESULT_BACKEND")

    @property
    def store(self) -> str:
        return self.complete(self.store_url or self.redis_url, "ITRAIN_STORE_URL")


#: Read on every use of a role's URL: parsed once per distinct URL and settings.
_complete_url = lru_cache(maxsize=64)(complete_url)


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings, read once from the environment."""
    return Settings()
