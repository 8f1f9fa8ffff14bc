"""TLS options of Redis URLs: the certificate rule of ``rediss://`` and its ``ssl_*`` options."""

from __future__ import annotations

import ssl
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from producer.errors import ConfigurationError

__all__ = ["CERT_REQS", "SSL_ARGS", "cert_reqs", "check_tls_url", "ssl_options"]

#: The values of ``ssl_cert_reqs`` accepted in a ``rediss://`` URL (any case), and what each means.
#: redis-py itself takes only the lower-case names; Celery's own error message suggests the
#: ``CERT_*`` ones: both are accepted here and handed on as redis-py's.
CERT_REQS = {
    "required": ssl.CERT_REQUIRED,
    "cert_required": ssl.CERT_REQUIRED,
    "optional": ssl.CERT_OPTIONAL,
    "cert_optional": ssl.CERT_OPTIONAL,
    "none": ssl.CERT_NONE,
    "cert_none": ssl.CERT_NONE,
}
_NAMES = {ssl.CERT_REQUIRED: "required", ssl.CERT_OPTIONAL: "optional", ssl.CERT_NONE: "none"}
SSL_ARGS = ("ssl_cert_reqs", "ssl_ca_certs", "ssl_certfile", "ssl_keyfile", "ssl_check_hostname")


def check_tls_url(url: str, name: str = "the Redis URL") -> str:
    """``url``, with its certificate requirement in redis-py's spelling when it is ``rediss://``.

    A ``rediss://`` URL must say whether the server's certificate is checked
    (``ssl_cert_reqs=required``, with ``ssl_ca_certs=/path/ca.crt`` for a private CA). Without
    it, Celery's result backend raises *after* a message was sent, so a caller that retries
    would train an event twice: refused here, when the client or worker starts, before
    anything is sent. ``ConfigurationError`` names the setting (``name``) and the fix.
    """
    parts = urlsplit(url)
    if parts.scheme not in ("rediss", "itrains"):
        return url
    query = parse_qsl(parts.query, keep_blank_values=True)
    mode = cert_reqs([v for k, v in query if k == "ssl_cert_reqs"], name, "rediss://")
    query = [(k, mode if k == "ssl_cert_reqs" else v) for k, v in query]
    return urlunsplit(parts._replace(query=urlencode(query, safe="/:")))


def ssl_options(url: str) -> dict[str, Any] | None:
    """The TLS options of a ``rediss://`` URL as Celery's ``broker_use_ssl`` (which Flower's
    broker pages read: they do not take them from the URL); None for a plain URL."""
    parts = urlsplit(url)
    if parts.scheme not in ("rediss", "itrains"):
        return None
    options: dict[str, Any] = {}
    for key, value in parse_qsl(parts.query, keep_blank_values=True):
        if key == "ssl_cert_reqs":
            options[key] = CERT_REQS.get(value.lower(), ssl.CERT_REQUIRED)
        elif key == "ssl_check_hostname":
            options[key] = value.lower() in ("1", "true", "yes")
        elif key in SSL_ARGS:
            options[key] = value
    return options


def cert_reqs(given: list[str], name: str, scheme: str) -> str:
    """The certificate requirement in redis-py's spelling (``required``, ``optional``, ``none``)
    from the ``ssl_cert_reqs`` values of a URL whose TLS is on; ``ConfigurationError`` when it is
    missing (Celery would raise *after* a message was sent) or unknown."""
    if not given:
        raise ConfigurationError(
            f"{name} is a {scheme} URL without ssl_cert_reqs: add ssl_cert_reqs=required (and "
            "ssl_ca_certs=/path/to/ca.crt for a private CA), or ssl_cert_reqs=none to skip "
            "verifying the server (not recommended)"
        )
    mode = CERT_REQS.get(given[-1].lower())
    if mode is None:
        raise ConfigurationError(
            f"{name}: ssl_cert_reqs={given[-1]} is not one of required, optional, none "
            "(or CERT_REQUIRED, CERT_OPTIONAL, CERT_NONE)"
        )
    return _NAMES[mode]
