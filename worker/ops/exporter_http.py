"""The exporter's HTTP server: ``/metrics`` behind optional basic auth, over optional TLS.

The password and the TLS key come from the environment or a file (``ITRAIN_EXPORTER_PASSWORD`` or
``ITRAIN_EXPORTER_PASSWORD_FILE``, ``ITRAIN_EXPORTER_TLS_CERT`` and ``ITRAIN_EXPORTER_TLS_KEY``),
never from a flag: a flag shows in ``ps`` to every user of the host, and is logged by process
supervisors. Nothing here logs the password, and a refused request says only that it is refused.

Prometheus sends the credentials with every scrape (its ``basic_auth``), so a check costs one
``hmac.compare_digest`` of two short byte strings, whose time does not depend on where they differ.
"""

from __future__ import annotations

import base64
import hmac
import logging
import socket
import ssl
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from producer.errors import ConfigurationError
from producer.settings import Settings

__all__ = ["Access", "access_from_settings", "basic_auth", "serve_wsgi", "tls_context"]

logger = logging.getLogger("itrain.exporter")

StartResponse = Callable[..., Any]
WsgiApp = Callable[[dict[str, Any], StartResponse], Iterable[bytes]]


@dataclass(frozen=True)
class Access:
    """Who may scrape, and how: basic auth when ``password`` is set, TLS when ``tls`` is."""

    user: str
    password: bytes | None
    tls: ssl.SSLContext | None

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"


def access_from_settings(settings: Settings) -> Access:
    """The exporter's ``Access`` from the settings; ``ConfigurationError`` naming the setting when
    a file cannot be read, a password is empty, or a certificate comes without its key."""
    password: bytes | None = None
    if settings.exporter_password is not None:
        password = settings.exporter_password.get_secret_value().encode()
        where = "ITRAIN_EXPORTER_PASSWORD"
    elif settings.exporter_password_file is not None:
        path = settings.exporter_password_file
        try:
            # One trailing newline is the file's, not the password's (`echo secret > file`).
            password = path.read_bytes().removesuffix(b"\n").removesuffix(b"\r")
        except OSError as exc:
            raise ConfigurationError(
                f"ITRAIN_EXPORTER_PASSWORD_FILE: cannot read {path}: {exc.strerror}"
            ) from None
        where = f"ITRAIN_EXPORTER_PASSWORD_FILE ({path})"
    if password is not None and not password:
        raise ConfigurationError(f"{where} is empty: set a password, or unset it to serve without auth")
    cert, key = settings.exporter_tls_cert, settings.exporter_tls_key
    tls = tls_context(cert, key) if cert is not None and key is not None else None
    return Access(settings.exporter_user, password, tls)


def tls_context(cert: Path, key: Path) -> ssl.SSLContext:
    """A server context (TLS 1.2 at least) with the certificate chain and its key loaded."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except FileNotFoundError as exc:
        raise ConfigurationError(
            f"ITRAIN_EXPORTER_TLS_CERT / ITRAIN_EXPORTER_TLS_KEY: no such file {exc.filename}"
        ) from None
    except (ssl.SSLError, OSError) as exc:
        raise ConfigurationError(
            f"ITRAIN_EXPORTER_TLS_CERT={cert} / ITRAIN_EXPORTER_TLS_KEY={key}: not a certificate and "
            f"its key in PEM ({exc})"
        ) from None
    return context


def basic_auth(app: WsgiApp, user: str, password: bytes, realm: str = "itrain exporter") -> WsgiApp:
    """``app`` behind HTTP basic auth: 401 with a challenge unless the request names ``user`` and
    ``password``."""
    expected = b"Basic " + base64.b64encode(user.encode() + b":" + password)

    def guarded(environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        # Compared whole, never decoded: the time taken depends on neither the user nor the
        # password given (compare_digest's depends only on the lengths).
        given = environ.get("HTTP_AUTHORIZATION", "").encode("latin-1", errors="replace")
        if hmac.compare_digest(given, expected):
            return app(environ, start_response)
        start_response(
            "401 Unauthorized",
            [
                ("WWW-Authenticate", f'Basic realm="{realm}", charset="UTF-8"'),
                ("Content-Type", "text/plain; charset=utf-8"),
            ],
        )
        return [b"401 Unauthorized: this exporter requires basic auth\n"]

    return guarded


class _Server(ThreadingMixIn, WSGIServer):
    """One thread per scrape, none kept when the process exits."""

    daemon_threads = True
    tls: ssl.SSLContext | None = None

    def get_request(self) -> tuple[Any, Any]:
        sock, addr = super().get_request()
        if self.tls is None:
            return sock, addr
        # The handshake runs in the scrape's thread (``_QuietHandler.setup``), so a client that
        # stalls it holds its own thread only, never the accept loop.
        return self.tls.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that fails the handshake or hangs up is its own problem: no traceback per scrape.
        logger.debug("exporter request from %s failed", client_address, exc_info=True)


class _QuietHandler(WSGIRequestHandler):
    """No line per request on stderr (Prometheus scrapes every few seconds)."""

    #: Seconds a client may stall (the handshake included) before its thread lets go.
    timeout = 30

    def setup(self) -> None:
        super().setup()
        if isinstance(self.connection, ssl.SSLSocket):
            self.connection.do_handshake()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def serve_wsgi(app: WsgiApp, address: str, port: int, access: Access) -> WSGIServer:
    """Serve ``app`` on ``address:port`` in a daemon thread, as ``access`` says; returns the server
    (``shutdown()`` stops it)."""
    if access.password is not None:
        app = basic_auth(app, access.user, access.password)
    family = socket.getaddrinfo(address, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0][0]
    # The class's family decides the socket it binds (an IPv6 address needs AF_INET6).
    server_class: type[_Server] = type(
        "_ExporterServer", (_Server,), {"address_family": family, "tls": access.tls}
    )
    server = server_class((address, port), _QuietHandler)
    server.set_app(app)
    threading.Thread(target=server.serve_forever, name="itrain-exporter-http", daemon=True).start()
    return server
