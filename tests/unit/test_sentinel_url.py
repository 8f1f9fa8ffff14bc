"""Sentinel URLs: read, completed by the settings, refused with a clear line, passwords masked."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from producer.client import client_settings
from producer.errors import ConfigurationError
from producer.redis_conn import redact_url
from producer.sentinel import parse_sentinel_url
from producer.settings import Settings

URL = "sentinel://:s3cret@h1:26379;sentinel://h2:26380;sentinel://h3/2"


def test_every_sentinel_and_the_master_login_are_read() -> None:
    parsed = parse_sentinel_url(URL)
    assert parsed.sentinels == (("h1", 26379), ("h2", 26380), ("h3", 26379))
    assert (parsed.password, parsed.db, parsed.master_name) == ("s3cret", 2, None)
    # Canonical: every part carries what kombu reads from whichever part it connects through.
    assert parse_sentinel_url(parsed.url()).url() == parsed.url()
    assert all(part.endswith("/2") and ":s3cret@" in part for part in parsed.url().split(";"))


def test_a_sentinel_url_without_a_master_name_is_refused_by_the_settings() -> None:
    with pytest.raises(ValidationError, match="ITRAIN_REDIS_URL is a sentinel URL without a master name"):
        Settings(redis_url=URL)
    with pytest.raises(ValidationError, match="ITRAIN_STORE_URL is a sentinel URL without a master name"):
        Settings(store_url=URL, sentinel_master=None)
    with pytest.raises(ConfigurationError, match="redis_url is a sentinel URL without a master name"):
        client_settings(URL, Settings(), 0)


def test_the_master_name_comes_from_the_setting_or_the_url() -> None:
    settings = Settings(redis_url=URL, sentinel_master="main", sentinel_password="spw")
    store = parse_sentinel_url(settings.store)
    assert (store.master_name, store.sentinel_password, store.password) == ("main", "spw", "s3cret")
    # A store on another sentinel group names its own master in the URL.
    other = "sentinel://g1:26379;sentinel://g2:26379/0?master_name=models"
    settings = Settings(redis_url=URL, store_url=other, sentinel_master="main")
    assert parse_sentinel_url(settings.store).master_name == "models"
    assert parse_sentinel_url(settings.broker).master_name == "main"
    assert Settings(redis_url=other).store.count("master_name=models") == 2


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("sentinel://h1;redis://h2", "is not a sentinel address"),
        ("sentinel://h1/1;sentinel://h2/2", "disagree on db"),
        ("sentinel://:a@h1;sentinel://:b@h2", "disagree on the password"),
        ("sentinel://h1?bogus=1", "unknown option 'bogus'"),
        ("sentinel://h1?ssl_ca_certs=/ca.crt", "without ssl_cert_reqs"),
        ("sentinel://h1?ssl_cert_reqs=maybe", "ssl_cert_reqs=maybe is not one of"),
    ],
)
def test_unreadable_sentinel_urls_are_refused(url: str, message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        Settings(redis_url=url, sentinel_master="m")


def test_tls_options_apply_to_the_master_and_the_sentinels() -> None:
    parsed = parse_sentinel_url(
        "sentinel://h1;sentinel://h2?ssl_cert_reqs=CERT_REQUIRED&ssl_ca_certs=/ca.crt"
    )
    tls = {"ssl": True, "ssl_cert_reqs": "required", "ssl_ca_certs": "/ca.crt"}
    assert parsed.master_kwargs(5.0).items() >= tls.items()
    assert parsed.sentinel_kwargs(5.0).items() >= tls.items()


def test_hung_sentinels_together_fit_in_the_timeout() -> None:
    parsed = parse_sentinel_url("sentinel://h1;sentinel://h2;sentinel://h3;sentinel://h4")
    kwargs = parsed.sentinel_kwargs(2.0)
    assert kwargs["socket_timeout"] * 4 <= 2.0
    assert kwargs["socket_connect_timeout"] * 4 <= 2.0


def test_every_password_of_a_sentinel_url_is_masked() -> None:
    url = Settings(redis_url=URL, sentinel_master="m", sentinel_password="sentinel-pw").broker
    shown = redact_url(url)
    assert "s3cret" not in shown
    assert "sentinel-pw" not in shown
    assert shown.count(":***@") == 3
    assert shown.count("sentinel_password=***") == 3
    assert redact_url("sentinel://u:p1@h1;sentinel://u:p2@h2/0?password=p3") == (
        "sentinel://u:***@h1;sentinel://u:***@h2/0?password=***"
    )
