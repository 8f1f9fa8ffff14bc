"""Starting and stopping local worker and Flower processes (``itrain up``, the benchmark, tests)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from celery import Celery

from producer.errors import ConfigurationError

__all__ = [
    "flower_command",
    "start_flower",
    "start_worker",
    "stop_process",
    "wait_for_workers",
    "worker_command",
]

ROOT = Path(__file__).resolve().parents[2]


def _celery(*args: str) -> list[str]:
    """``celery -A worker ...`` with this interpreter's Celery."""
    return [sys.executable, "-m", "celery", "-A", "worker", *args]


def worker_command(name: str, concurrency: int, loglevel: str = "info", pool: str = "prefork") -> list[str]:
    """The command line a container or a shell uses to start one worker."""
    return _celery(
        "worker",
        "--hostname",
        f"{name}@%h",
        "--concurrency",
        str(concurrency),
        "--pool",
        pool,
        "--loglevel",
        loglevel,
        "--without-gossip",
        "--without-mingle",
    )


def flower_command(port: int, address: str = "127.0.0.1") -> list[str]:
    return _celery("flower", f"--address={address}", f"--port={port}")


def _popen(cmd: list[str], env: Mapping[str, str], log: Path | None) -> subprocess.Popen[bytes]:
    out = open(log, "ab") if log else subprocess.DEVNULL  # noqa: SIM115 - the child owns it
    return subprocess.Popen(
        cmd,
        env={**os.environ, **env},
        cwd=ROOT,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,  # Ctrl-C in a terminal reaches only us; we stop the children
    )


def start_worker(
    name: str,
    env: Mapping[str, str],
    *,
    concurrency: int = 2,
    log: Path | None = None,
    loglevel: str = "info",
    pool: str = "prefork",
) -> subprocess.Popen[bytes]:
    return _popen(worker_command(name, concurrency, loglevel, pool), env, log)


def start_flower(port: int, env: Mapping[str, str], *, log: Path | None = None) -> subprocess.Popen[bytes]:
    return _popen(flower_command(port), env, log)


def wait_for_workers(app: Celery, count: int, timeout: float = 60.0) -> list[str]:
    """Block until ``count`` workers answer a ping; their names."""
    deadline = time.monotonic() + timeout
    names: list[str] = []
    while time.monotonic() < deadline:
        replies = app.control.ping(timeout=1.0) or []
        names = sorted(name for reply in replies for name in reply)
        if len(names) >= count:
            return names
        time.sleep(0.2)
    raise ConfigurationError(f"only {len(names)} of {count} worker(s) answered within {timeout:g} s")


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """Warm shutdown (SIGTERM) of a process we started, then SIGKILL of its group if it hangs."""
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout)
