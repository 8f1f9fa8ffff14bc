"""Unit tests of configuration (``producer.settings``) and of URL redaction."""

from __future__ import annotations

import os
from urllib.parse import urlsplit

import pydantic
import pytest

from producer.redis_conn import redact_url
from producer.settings import DEFAULT_TARGETS, Settings, get_settings


@pytest.fixture
def clean_env(monkeypatch):
    """No ``ITRAIN_*`` variable from the outside (monkeypatch restores them after the test)."""
    for name in list(os.environ):
        if name.upper().startswith("ITRAIN_"):
            monkeypatch.delenv(name)
    return monkeypatch


# -- defaults -------------------------------------------------------------------------------------


def test_defaults_follow_the_contract(clean_env) -> None:
    """Every default in the contract's configuration table."""
    # Given no ITRAIN_* variable
    # When settings are read
    s = Settings()
    # Then the contract's defaults apply
    assert s.redis_url == "redis://localhost:6379/0"
    assert s.broker == s.backend == s.store == "redis://localhost:6379/0"
    assert s.queue == "itrain"
    assert s.result_expires == 1800
    assert 60 <= s.visibility_timeout < 3600, "minutes, not the transport's hour"
    assert 1 <= s.lock_timeout <= 30, "a few seconds"
    assert s.max_queue_length == 0
    assert s.publish_timeout > 0
    assert s.dedupe_ttl >= (s.max_deliveries + 1) * s.visibility_timeout


def test_default_targets(clean_env) -> None:
    """Default action targets: purchase/click/like 1.0, view 0.5, dismiss/skip 0.0."""
    # When settings are read with no override
    targets = Settings().targets
    # Then the mapping holds the documented values
    assert targets == DEFAULT_TARGETS
    for action, value in {
        "purchase": 1.0,
        "click": 1.0,
        "like": 1.0,
        "view": 0.5,
        "dismiss": 0.0,
        "skip": 0.0,
    }.items():
        assert targets[action] == value


def test_default_targets_are_not_shared(clean_env) -> None:
    """Each Settings gets its own copy of the default mapping."""
    # Given two settings objects
    a, b = Settings(), Settings()
    # Then their mappings are not the module constant
    assert a.targets is not DEFAULT_TARGETS
    assert a.targets is not b.targets


# -- environment ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("var", "value", "attr", "expected"),
    [
        ("ITRAIN_REDIS_URL", "redis://example.net:6390/3", "redis_url", "redis://example.net:6390/3"),
        ("ITRAIN_QUEUE", "q-other", "queue", "q-other"),
        ("ITRAIN_LOCK_TIMEOUT", "2.5", "lock_timeout", 2.5),
        ("ITRAIN_VISIBILITY_TIMEOUT", "120", "visibility_timeout", 120),
        ("ITRAIN_RESULT_EXPIRES", "60", "result_expires", 60),
        ("ITRAIN_MAX_QUEUE_LENGTH", "1000", "max_queue_length", 1000),
        ("ITRAIN_TARGETS", '{"hover": 0.3}', "targets", {"hover": 0.3}),
        ("itrain_queue", "lower-case", "queue", "lower-case"),
    ],
)
def test_environment_with_prefix(clean_env, var, value, attr, expected) -> None:
    """Each setting is read from ITRAIN_<NAME>."""
    # Given the variable set
    clean_env.setenv(var, value)
    # When settings are read
    s = Settings()
    # Then the value is used
    assert getattr(s, attr) == expected


@pytest.mark.parametrize("var", ["REDIS_URL", "QUEUE", "ITRAINQUEUE"])
def test_environment_without_prefix_is_ignored(clean_env, var) -> None:
    """Variables without the ITRAIN_ prefix do not configure anything."""
    # Given an unprefixed variable
    clean_env.setenv(var, "redis://elsewhere:1/0" if "URL" in var else "elsewhere")
    # When settings are read
    s = Settings()
    # Then the defaults stand
    assert s.redis_url == "redis://localhost:6379/0"
    assert s.queue == "itrain"


@pytest.mark.parametrize(
    ("var", "role"),
    [("ITRAIN_BROKER_URL", "broker"), ("ITRAIN_RESULT_BACKEND", "backend"), ("ITRAIN_STORE_URL", "store")],
)
def test_role_override_and_fallback(clean_env, var, role) -> None:
    """One role can be moved; the others still use ITRAIN_REDIS_URL."""
    # Given a base URL and one role overridden
    clean_env.setenv("ITRAIN_REDIS_URL", "redis://base:6379/0")
    clean_env.setenv(var, "rediss://other:6380/5?ssl_cert_reqs=required")
    # When settings are read
    s = Settings()
    # Then that role uses the override and the others the base URL
    roles = {r: getattr(s, r) for r in ("broker", "backend", "store")}
    assert roles.pop(role) == "rediss://other:6380/5?ssl_cert_reqs=required"
    assert set(roles.values()) == {"redis://base:6379/0"}


def test_get_settings_is_cached_until_cleared(clean_env) -> None:
    """``get_settings`` reads the environment once; ``cache_clear`` makes it read again."""
    get_settings.cache_clear()
    try:
        # Given settings read once
        clean_env.setenv("ITRAIN_QUEUE", "first")
        first = get_settings()
        # When the environment changes
        clean_env.setenv("ITRAIN_QUEUE", "second")
        # Then the cached object is returned until the cache is cleared
        assert get_settings() is first
        assert first.queue == "first"
        get_settings.cache_clear()
        assert get_settings().queue == "second"
    finally:
        get_settings.cache_clear()


# -- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("dedupe", "visibility", "deliveries"),
    [("300", "300", "5"), ("1799", "300", "5"), ("3600", "7200", "5"), ("599", "300", "1")],
)
def test_dedupe_window_must_cover_every_redelivery(clean_env, dedupe, visibility, deliveries) -> None:
    """A de-duplication marker that expires before the last redelivery would train an event twice:
    the window must be at least (ITRAIN_MAX_DELIVERIES + 1) x ITRAIN_VISIBILITY_TIMEOUT."""
    # Given a de-duplication window shorter than that
    clean_env.setenv("ITRAIN_DEDUPE_TTL", dedupe)
    clean_env.setenv("ITRAIN_VISIBILITY_TIMEOUT", visibility)
    clean_env.setenv("ITRAIN_MAX_DELIVERIES", deliveries)
    # When settings are read
    with pytest.raises(pydantic.ValidationError) as info:
        Settings()
    # Then the three settings are named
    assert "ITRAIN_DEDUPE_TTL" in str(info.value)
    assert "ITRAIN_VISIBILITY_TIMEOUT" in str(info.value)
    assert "ITRAIN_MAX_DELIVERIES" in str(info.value)


def test_dedupe_window_at_its_floor_is_accepted(clean_env) -> None:
    clean_env.setenv("ITRAIN_DEDUPE_TTL", "1800")
    assert Settings().dedupe_ttl == (Settings().max_deliveries + 1) * Settings().visibility_timeout


@pytest.mark.parametrize("value", ["1.5", "-0.1", "NaN"])
def test_target_outside_unit_interval_rejected(clean_env, value) -> None:
    """A target mapping value outside [0, 1] is refused, naming the action."""
    # Given a mapping with an impossible value
    clean_env.setenv("ITRAIN_TARGETS", f'{{"click": 1.0, "hover": {value}}}')
    # When settings are read
    with pytest.raises(pydantic.ValidationError) as info:
        Settings()
    # Then the error names the action
    assert "hover" in str(info.value)


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("ITRAIN_LOCK_TIMEOUT", "abc"),
        ("ITRAIN_LOCK_TIMEOUT", "0"),
        ("ITRAIN_LOCK_TIMEOUT", "-1"),
        ("ITRAIN_VISIBILITY_TIMEOUT", "0"),
        ("ITRAIN_RESULT_EXPIRES", "0"),
        ("ITRAIN_MAX_QUEUE_LENGTH", "-1"),
        ("ITRAIN_QUEUE", ""),
        ("ITRAIN_LOCK_POLL", "10"),
        ("ITRAIN_MIN_REPLICAS", "-1"),
        ("ITRAIN_MIN_REPLICAS", "one"),
        ("ITRAIN_REPLICA_TIMEOUT_MS", "0"),
        ("ITRAIN_REPLICA_TIMEOUT_MS", "-5"),
    ],
)
def test_invalid_values_rejected(clean_env, var, value) -> None:
    """Unparsable or out-of-range values are refused at start-up."""
    # Given a bad value
    clean_env.setenv(var, value)
    # When settings are read
    with pytest.raises(pydantic.ValidationError) as info:
        Settings()
    # Then the error is about that setting
    name = var.removeprefix("ITRAIN_")
    assert name.lower() in str(info.value).lower()


def test_replica_settings_default_to_no_waiting(clean_env) -> None:
    """Out of the box nothing waits for replicas; the wait is bounded by one second."""
    assert (Settings().min_replicas, Settings().replica_timeout_ms) == (0, 1000)


def test_replica_timeout_must_end_before_the_socket_gives_up(clean_env) -> None:
    """A WAIT that outlasts the socket timeout (ITRAIN_PUBLISH_TIMEOUT) would make the client
    push again: refused, naming both settings."""
    # Given replicas to wait for, longer than the publish timeout
    clean_env.setenv("ITRAIN_MIN_REPLICAS", "1")
    clean_env.setenv("ITRAIN_PUBLISH_TIMEOUT", "2")
    clean_env.setenv("ITRAIN_REPLICA_TIMEOUT_MS", "2000")
    # When settings are read
    with pytest.raises(pydantic.ValidationError) as info:
        Settings()
    # Then both are named
    assert "ITRAIN_REPLICA_TIMEOUT_MS=2000" in str(info.value)
    assert "ITRAIN_PUBLISH_TIMEOUT=2 s" in str(info.value)
    # and a shorter wait is accepted
    clean_env.setenv("ITRAIN_REPLICA_TIMEOUT_MS", "1999")
    assert Settings().min_replicas == 1


# -- redact_url -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("redis://:s3cret@cache.local:6379/0", "redis://:***@cache.local:6379/0"),
        ("rediss://app:s3cret@cache.local:6380/2", "rediss://app:***@cache.local:6380/2"),
        ("redis://app:s3cret@cache.local/0", "redis://app:***@cache.local/0"),
    ],
)
def test_redact_url_hides_password(url, expected) -> None:
    """The password becomes ***; scheme, user, host, port and database stay readable."""
    # When the URL is redacted
    red = redact_url(url)
    # Then the password is gone and the rest is intact
    assert "s3cret" not in red
    assert red == expected


@pytest.mark.parametrize("url", ["redis://localhost:6379/0", "rediss://app@cache.local:6380/1"])
def test_redact_url_without_password_unchanged(url) -> None:
    """A URL without a password is returned as is."""
    assert redact_url(url) == url


def test_redact_url_hides_password_in_query() -> None:
    """redis-py also takes the password as a query argument: it must be hidden as well."""
    # Given a password in the query string (redis-py honours ?password=)
    url = "redis://cache.local:6379/0?password=s3cret&socket_timeout=5"
    # When redacted
    red = redact_url(url)
    # Then it is hidden and the other argument kept
    assert "s3cret" not in red
    assert "socket_timeout=5" in red


def test_redact_url_keeps_ipv6_host() -> None:
    """Redaction keeps an IPv6 host in brackets, so the message still names the right server."""
    # Given a password URL with an IPv6 host
    url = "redis://:s3cret@[::1]:6379/0"
    # When redacted
    red = redact_url(url)
    # Then the password is gone and host and port still parse the same
    assert "s3cret" not in red
    assert urlsplit(red).hostname == "::1"
    assert urlsplit(red).port == 6379


@pytest.mark.parametrize(
    "var", ["ITRAIN_REDIS_URL", "ITRAIN_BROKER_URL", "ITRAIN_RESULT_BACKEND", "ITRAIN_STORE_URL"]
)
def test_rediss_url_without_a_certificate_requirement_is_refused(clean_env, var) -> None:
    """A rediss:// URL must say whether the server is verified: refused when the settings are read
    (before anything is sent), naming the variable and the fix."""
    clean_env.setenv(var, "rediss://redis.example:6380/0")
    with pytest.raises(pydantic.ValidationError) as caught:
        Settings()
    text = str(caught.value)
    assert f"{var} is a rediss:// URL without ssl_cert_reqs" in text
    assert "ssl_cert_reqs=required" in text


@pytest.mark.parametrize(
    ("given", "stored"),
    [
        ("required", "required"),
        ("CERT_REQUIRED", "required"),
        ("CERT_NONE", "none"),
        ("Optional", "optional"),
    ],
)
def test_certificate_requirement_names_are_normalised_for_redis_py(clean_env, given, stored) -> None:
    """redis-py takes only the lower-case names; Celery's error message suggests CERT_REQUIRED."""
    clean_env.setenv("ITRAIN_REDIS_URL", f"rediss://r:6380/0?ssl_cert_reqs={given}&ssl_ca_certs=/etc/ca.crt")
    assert Settings().redis_url == f"rediss://r:6380/0?ssl_cert_reqs={stored}&ssl_ca_certs=/etc/ca.crt"


def test_unknown_certificate_requirement_is_refused(clean_env) -> None:
    clean_env.setenv("ITRAIN_REDIS_URL", "rediss://r:6380/0?ssl_cert_reqs=always")
    with pytest.raises(pydantic.ValidationError, match="ssl_cert_reqs=always is not one of required"):
        Settings()
