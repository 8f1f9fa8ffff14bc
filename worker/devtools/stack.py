"""Starting and stopping local worker and Flower processes (``itrain up``, the benchmark, tests)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path

from celery import Celery

from producer.errors import ConfigurationError

__all__ = [
    "APP",
    "flower_command",
    "log_tail",
    "node_name",
    "start_exporter",
    "start_flower",
    "start_process",
    "start_worker",
    "stop_process",
    "stop_processes",
    "wait_for_workers",
    "worker_command",
]

ROOT = Path(__file__).resolve().parents[2]


#: The production app module: ``celery -A worker`` registers the production tasks only.
APP = "worker"


def _celery(app: str, *args: str) -> list[str]:
    """``celery -A <app> ...`` with this interpreter's Celery."""
    return [sys.executable, "-m", "celery", "-A", app, *args]


def worker_command(
    name: str,
    concurrency: int,
    loglevel: str = "info",
    pool: str = "prefork",
    *,
    app: str = APP,
    queues: Sequence[str] = (),
) -> list[str]:
    """The command line a container or a shell uses to start one worker of ``app`` (the
    production app unless a dev tool names its own, as the benchmark does); ``queues``: the
    queues it consumes, as Celery's ``-Q`` (default: the settings')."""
    return _celery(
        app,
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
        *(("-Q", ",".join(queues)) if queues else ()),
    )


def flower_command(port: int, address: str = "127.0.0.1") -> list[str]:
    return _celery(APP, "flower", f"--address={address}", f"--port={port}")


def start_process(cmd: list[str], env: Mapping[str, str], log: Path | None = None) -> subprocess.Popen[bytes]:
    """``cmd`` in its own session (its process group id is its pid), from the repository root,
    with ``env`` over this process's environment; output to ``log`` (appended) or nowhere."""
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
    app: str = APP,
    queues: Sequence[str] = (),
) -> subprocess.Popen[bytes]:
    """One worker process in its own session (its process group id is its pid)."""
    return start_process(worker_command(name, concurrency, loglevel, pool, app=app, queues=queues), env, log)


def start_flower(port: int, env: Mapping[str, str], *, log: Path | None = None) -> subprocess.Popen[bytes]:
    return start_process(flower_command(port), env, log)


def start_exporter(port: int, env: Mapping[str, str], *, log: Path | None = None) -> subprocess.Popen[bytes]:
    """``itrain exporter`` on 127.0.0.1:``port``."""
    return start_process([sys.executable, "-m", "worker.cli", "exporter", "--port", str(port)], env, log)


def node_name(name: str) -> str:
    """The node name Celery gives a worker started with ``--hostname <name>@%h``."""
    return f"{name}@{socket.gethostname()}"


#: Lines of a worker's log shown when it does not start.
LOG_TAIL_LINES = 20


def log_tail(log: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of ``log``, under a line naming it (empty when there is none)."""
    try:
        text = log.read_text(errors="replace")
    except OSError:
        return ""
    tail = text.splitlines()[-lines:]
    return "\n".join([f"--- last {len(tail)} lines of {log} ---", *tail]) if tail else ""


def wait_for_workers(
    app: Celery,
    count: int = 0,
    *,
    names: Collection[str] = (),
    procs: Sequence[subprocess.Popen[bytes]] = (),
    logs: Sequence[Path | None] = (),
    timeout: float = 60.0,
) -> list[str]:
    """Block until at least ``count`` workers, and every node of ``names`` (``node_name``), answer a
    ping; the names of all that answered. ``ConfigurationError`` at once when one of ``procs``
    exits, or when they are not all there after ``timeout`` seconds.

    ``logs``, in the order of ``procs`` (and of ``names`` when both are given), are the workers'
    log files: the error ends with the last lines of the log of each worker that exited or did
    not answer, so whoever reads it sees the cause (a worker that cannot use its Redis says why).
    """
    want = set(names)
    deadline = time.monotonic() + timeout
    seen: list[str] = []
    while True:
        for i, proc in enumerate(procs):
            if proc.poll() is not None:
                raise ConfigurationError(
                    f"worker process {proc.pid} exited ({proc.returncode}) while starting"
                    + _tails(logs[i : i + 1])
                )
        # With names, ping only those: the call returns as soon as all of them have answered.
        replies = app.control.ping(destination=sorted(want) if want else None, timeout=1.0) or []
        seen = sorted(name for reply in replies for name in reply)
        if want <= set(seen) and len(seen) >= count:
            return seen
        if time.monotonic() > deadline:
            missing = sorted(want - set(seen))
            # With names, the logs of the silent ones; without, every log given.
            silent = (
                [log for name, log in zip(names, logs, strict=False) if name in missing] if want else logs
            )
            raise ConfigurationError(
                f"only {len(seen)} of {max(count, len(want))} worker(s) answered a ping within {timeout:g} s"
                + (f"; missing {', '.join(missing)}" if missing else "")
                + _tails(silent)
            )
        time.sleep(0.2)


def _tails(logs: Sequence[Path | None]) -> str:
    text = "\n".join(tail for log in logs if log is not None and (tail := log_tail(log)))
    return f"\n{text}" if text else ""


def stop_process(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> None:
    """Warm shutdown (SIGTERM) of a process we started, then SIGKILL of its group if it hangs."""
    stop_processes([proc], timeout)


def stop_processes(procs: Sequence[subprocess.Popen[bytes]], timeout: float = 20.0) -> None:
    """``stop_process`` of several at once: all are told first, so their warm shutdowns overlap
    (two workers that each hang for the whole timeout cost it once, not twice)."""
    live = [proc for proc in procs if proc.poll() is None]
    for proc in live:
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for proc in live:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout)
