"""``itrain up --replicas 2`` as a user runs it: a master, two replicas and three sentinels with the
workers, Flower and the exporter on the sentinel URL it prints; a client on that URL trains,
``itrain stats`` works, and SIGTERM or SIGINT stops every process it started."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from producer.client import TrainingClient
from producer.settings import Settings
from tests.helpers import alive, descendants, make_event, statuses, wait_http, wait_until
from worker.devtools.embedded_redis import free_port
from worker.devtools.stack import ROOT

pytestmark = pytest.mark.timeout(600)

ITRAIN = [sys.executable, "-m", "worker.cli"]


def _clean_env() -> dict[str, str]:
    # The stack is the only Redis these commands may use: no ITRAIN_* of the test session.
    return {k: v for k, v in os.environ.items() if not k.startswith("ITRAIN_")}


class Up:
    """A running ``itrain up`` and what it printed."""

    def __init__(self, proc: subprocess.Popen[bytes], out: Path) -> None:
        self.proc, self.out = proc, out
        self.env: dict[str, str] = {}

    def text(self) -> str:
        return self.out.read_text(errors="replace")

    def wait_up(self, timeout: float = 240) -> None:
        def ready() -> bool:
            assert self.proc.poll() is None, f"itrain up exited ({self.proc.returncode}):\n{self.text()}"
            return "Ctrl-C stops everything." in self.text()

        wait_until(ready, timeout, "itrain up to start")
        for line in self.text().splitlines():
            if line.startswith("export "):
                key, _, value = line.removeprefix("export ").partition("=")
                self.env[key] = value.strip("'")

    def stop(self, sig: int, timeout: float = 120) -> list[int]:
        """Send ``sig`` and wait for the exit; the pids it had started that are still alive."""
        started = descendants(self.proc.pid)
        assert started, "itrain up has no child process"
        self.proc.send_signal(sig)
        self.proc.wait(timeout)
        return [pid for pid in started if alive(pid)]


@contextmanager
def itrain_up(tmp_path: Path, *args: str) -> Iterator[Up]:
    out = tmp_path / "up.out"
    with open(out, "wb") as sink:
        proc = subprocess.Popen(
            [*ITRAIN, "up", "--replicas", "2", *args],
            env={**_clean_env(), "PYTHONPATH": str(ROOT)},
            cwd=tmp_path,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    up = Up(proc, out)
    try:
        yield up
    finally:
        if proc.poll() is None:  # a failed test: stop it all the same (SIGTERM, then SIGKILL)
            left = descendants(proc.pid)
            proc.terminate()
            try:
                proc.wait(120)
            except subprocess.TimeoutExpired:
                proc.kill()
            for pid in left:
                if alive(pid):
                    os.kill(pid, signal.SIGKILL)


def _itrain(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*ITRAIN, *args],
        env={**_clean_env(), **env},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_itrain_up_with_replicas_trains_on_the_sentinel_url_and_stops_on_sigterm(tmp_path: Path) -> None:
    flower, exporter = free_port(), free_port()
    with itrain_up(
        tmp_path,
        "--workers",
        "1",
        "--concurrency",
        "1",
        "--flower-port",
        str(flower),
        "--exporter-port",
        str(exporter),
    ) as up:
        # Given the stack, up, and the URL and master name it printed
        up.wait_up()
        url, name = up.env["ITRAIN_REDIS_URL"], up.env["ITRAIN_SENTINEL_MASTER"]
        assert url.startswith("sentinel://127.0.0.1:")
        assert len(url.split(";")) == 3
        assert name == "itrain"
        # When a model is made, and a client on that URL trains events
        made = _itrain(up.env, "init", "--model", "ha")
        assert made.returncode == 0, made.stderr
        settings = Settings(redis_url=url, sentinel_master=name)
        events = [make_event("ha", i, "up") for i in range(20)]
        with TrainingClient(settings=settings) as client:
            results = client.wait_all(
                client.train_many(events[:10]) + [client.train_step(e) for e in events[10:]]
            )
        # Then every event trained, and `itrain stats` reads them and names the master
        assert statuses(results) == {"trained": 20}
        as_json = _itrain(up.env, "stats", "--model", "ha", "--json")
        assert as_json.returncode == 0, as_json.stderr
        assert json.loads(as_json.stdout)["step"] == 20
        table = _itrain(up.env, "stats", "--model", "ha")
        assert f"(named by the sentinels of {name})" in table.stdout, table.stdout
        # And Flower and the exporter answer, on the same stack
        status, _ = wait_http(f"http://127.0.0.1:{flower}/", up.proc, timeout=60)
        assert status == 200
        status, body = wait_http(f"http://127.0.0.1:{exporter}/metrics", up.proc, timeout=60)
        assert status == 200
        assert b'model="ha"' in body
        # When it is sent SIGTERM, then it exits 0 and leaves no process behind
        left = up.stop(signal.SIGTERM)
        assert up.proc.returncode == 0, up.text()
        assert left == []


def test_itrain_up_with_replicas_stops_on_sigint(tmp_path: Path) -> None:
    with itrain_up(tmp_path, "--workers", "1", "--concurrency", "1", "--no-flower", "--no-exporter") as up:
        # Given the stack, up (three sentinels, three servers and a worker started by it)
        up.wait_up()
        assert len(descendants(up.proc.pid)) >= 7
        # When it is sent SIGINT (Ctrl-C), then it stops every process it started
        left = up.stop(signal.SIGINT)
        assert up.proc.returncode == 0, up.text()
        assert left == []
        assert "stopping ..." in up.text()
