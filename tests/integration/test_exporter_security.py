"""``itrain exporter`` behind basic auth and over TLS: real HTTP requests to the real command; the
password and the key come from the environment or files, never from a flag, a log or ``ps``."""

from __future__ import annotations

import base64
import os
import socket
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import http_get, make_certificates, wait_until
from worker.devtools.embedded_redis import free_port

PASSWORD = "s3cret-scrape-Ω"


@pytest.fixture
def exporter(redis_url: str, tmp_path: Path) -> Iterator[Any]:
    """``exporter(env)``: ``itrain exporter`` on a free port with these settings, listening;
    returns (port, process). Stopped by pid at teardown."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(extra: dict[str, str]) -> tuple[int, subprocess.Popen[bytes]]:
        port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("ITRAIN_EXPORTER_")}
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "exporter", "--port", str(port)],
            env={**env, "ITRAIN_REDIS_URL": redis_url, **extra},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        procs.append(proc)

        def listening() -> bool:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else proc.returncode
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except OSError:
                return False
            return True

        wait_until(listening, 30, "the exporter listening")
        return port, proc

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(10)


def https_get(url: str, ca: Path, auth: tuple[str, str] | None = None) -> tuple[int, bytes]:
    """GET over TLS, the server verified against ``ca``: (status, body)."""
    context = ssl.create_default_context(cafile=str(ca))
    request = urllib.request.Request(url)
    if auth:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=5, context=context) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())


def run_exporter(redis_url: str, extra: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """``itrain exporter`` expected to stop at once (a bad setting)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ITRAIN_EXPORTER_")}
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", "exporter", "--port", str(free_port())],
        env={**env, "ITRAIN_REDIS_URL": redis_url, **extra},
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_basic_auth_refuses_without_the_password_and_serves_with_it(exporter, make_model) -> None:
    # Given an exporter whose password comes from the environment
    model = make_model()
    port, proc = exporter({"ITRAIN_EXPORTER_PASSWORD": PASSWORD})
    url = f"http://127.0.0.1:{port}/metrics"
    # When it is asked without credentials, with a wrong password or user, or with the right ones
    status, body = http_get(url)
    # Then only the right ones get the metrics; the others a 401 that names no secret
    assert status == 401
    assert b"itrain_" not in body
    assert http_get(url, ("prometheus", PASSWORD + "x"))[0] == 401
    assert http_get(url, ("prometheus", PASSWORD[:-1]))[0] == 401
    assert http_get(url, ("admin", PASSWORD))[0] == 401
    status, body = http_get(url, ("prometheus", PASSWORD))
    assert status == 200
    assert f'itrain_model_step{{model="{model}"}} 0.0'.encode() in body
    # And the challenge tells a browser to ask
    request = urllib.request.Request(url)
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=5)
    assert refused.value.headers["WWW-Authenticate"].startswith('Basic realm="itrain exporter"')
    # And the password shows neither in `ps` nor in what the exporter printed
    assert PASSWORD.encode() not in Path(f"/proc/{proc.pid}/cmdline").read_bytes()
    proc.terminate()
    printed, _ = proc.communicate(timeout=10)
    assert b"basic auth as user prometheus" in printed
    assert PASSWORD.encode() not in printed


def test_tls_with_a_password_file_and_a_user_of_our_choice(exporter, tmp_path: Path) -> None:
    # Given a certificate for 127.0.0.1 signed by the test's CA, and the password in a file
    # written with a trailing newline (as `echo` writes it)
    make_certificates(tmp_path)
    (tmp_path / "password").write_text(PASSWORD + "\n")
    port, proc = exporter(
        {
            "ITRAIN_EXPORTER_USER": "scraper",
            "ITRAIN_EXPORTER_PASSWORD_FILE": str(tmp_path / "password"),
            "ITRAIN_EXPORTER_TLS_CERT": str(tmp_path / "server.crt"),
            "ITRAIN_EXPORTER_TLS_KEY": str(tmp_path / "server.key"),
        }
    )
    url = f"https://127.0.0.1:{port}/metrics"
    # When a client verifies the server and logs in
    status, body = https_get(url, tmp_path / "ca.crt", ("scraper", PASSWORD))
    # Then the handshake succeeds and the metrics come back; without credentials, a 401
    assert status == 200
    assert b"itrain_up 1.0" in body
    assert https_get(url, tmp_path / "ca.crt")[0] == 401
    # And a client that does not trust the certificate fails its handshake
    with pytest.raises(urllib.error.URLError) as untrusted:
        urllib.request.urlopen(url, timeout=5, context=ssl.create_default_context())
    assert isinstance(untrusted.value.reason, ssl.SSLCertVerificationError)
    # And plain HTTP on the TLS port gets no metrics, and leaves the exporter serving
    with pytest.raises((OSError, urllib.error.URLError)):
        http_get(f"http://127.0.0.1:{port}/metrics", ("scraper", PASSWORD))
    # (a client that connects and says nothing holds its own thread, not the accept loop)
    with socket.create_connection(("127.0.0.1", port)):
        assert https_get(url, tmp_path / "ca.crt", ("scraper", PASSWORD))[0] == 200
    assert proc.poll() is None


@pytest.mark.parametrize(
    ("settings", "code", "says"),
    [
        (
            {"ITRAIN_EXPORTER_PASSWORD_FILE": "/nonexistent/pw"},
            1,
            "ITRAIN_EXPORTER_PASSWORD_FILE: cannot read",
        ),
        ({"ITRAIN_EXPORTER_PASSWORD": ""}, 1, "ITRAIN_EXPORTER_PASSWORD is empty"),
        (
            {"ITRAIN_EXPORTER_PASSWORD": "a", "ITRAIN_EXPORTER_PASSWORD_FILE": "/etc/hostname"},
            2,
            "set one of ITRAIN_EXPORTER_PASSWORD and ITRAIN_EXPORTER_PASSWORD_FILE",
        ),
        ({"ITRAIN_EXPORTER_TLS_CERT": "/etc/hostname"}, 2, "ITRAIN_EXPORTER_TLS_KEY go together"),
        (
            {"ITRAIN_EXPORTER_TLS_CERT": "/etc/hostname", "ITRAIN_EXPORTER_TLS_KEY": "/etc/hostname"},
            1,
            "not a certificate and its key in PEM",
        ),
        ({"ITRAIN_EXPORTER_USER": "a:b"}, 2, "ITRAIN_EXPORTER_USER"),
    ],
    ids=["missing-file", "empty", "both", "cert-alone", "not-pem", "colon-user"],
)
def test_a_bad_security_setting_is_one_line_naming_it(
    redis_url: str, settings: dict[str, str], code: int, says: str
) -> None:
    done = run_exporter(redis_url, settings)
    assert done.returncode == code, done.stderr
    assert says in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Traceback" not in done.stderr
