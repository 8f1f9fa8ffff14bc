"""``itrain up`` and ``itrain demo`` put the cause on screen when a worker does not start: the
error ends with the last lines of that worker's log."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from producer.client import TrainingClient
from producer.errors import ConfigurationError
from worker.devtools.embedded_redis import RedisServer
from worker.devtools.stack import LOG_TAIL_LINES, wait_for_workers

ITRAIN = str(Path(sys.executable).with_name("itrain"))


@pytest.fixture
def lru_redis() -> Iterator[RedisServer]:
    # A server every worker refuses at start (it may evict keys), so the worker exits with a line.
    with RedisServer(extra=["--maxmemory-policy", "allkeys-lru"]) as server:
        yield server


def test_itrain_up_shows_the_log_of_a_worker_that_exited(lru_redis: RedisServer, tmp_path: Path) -> None:
    # Given a configured Redis the workers refuse
    env = {k: v for k, v in os.environ.items() if not k.startswith("ITRAIN_")}
    env["ITRAIN_REDIS_URL"] = lru_redis.url
    # When `itrain up` starts its worker
    done = subprocess.run(
        [ITRAIN, "up", "--workers", "1", "--no-flower", "--no-exporter"],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=240,
    )
    # Then it gives up on it and shows why: the worker's own error line, from its log
    assert done.returncode == 1, done
    assert "exited" in done.stderr, done.stderr
    log = tmp_path / ".itrain" / "logs" / "worker1.log"
    assert f"lines of {log.relative_to(tmp_path)} ---" in done.stderr, done.stderr
    assert "maxmemory-policy allkeys-lru" in done.stderr, done.stderr


def test_a_worker_that_does_not_answer_has_its_last_log_lines_in_the_error(
    redis_url: str, tmp_path: Path
) -> None:
    # Given a node that never answers a ping, and its log
    log = tmp_path / "silent.log"
    log.write_text("".join(f"log line {i}\n" for i in range(1, 41)))
    other = tmp_path / "other.log"
    other.write_text("not this one\n")
    # When the wait gives up on it
    with TrainingClient(redis_url=redis_url) as client, pytest.raises(ConfigurationError) as caught:
        wait_for_workers(client.app, names=["silent@nowhere"], logs=[log, other], timeout=2)
    # Then the error ends with the last lines of that node's log, and only of its log
    text = str(caught.value)
    assert text.startswith("only 0 of 1 worker(s) answered a ping within 2 s; missing silent@nowhere\n")
    shown = [line for line in text.splitlines() if line.startswith("log line ")]
    assert shown == [f"log line {i}" for i in range(41 - LOG_TAIL_LINES, 41)]
    assert "not this one" not in text
