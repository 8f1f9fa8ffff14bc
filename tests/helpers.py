"""Helpers shared by the test modules (not a test module).

One worker launcher (``Workers``), one event factory (``make_event``, ``make_events``), one ping
loop (``worker.devtools.stack.wait_for_workers``). Real processes only: workers are
``celery -A worker worker`` subprocesses started by ``worker.devtools.stack.start_worker`` (each in
its own session, so its process group id is its pid), and every signal goes to a pid or a process
group this module started.
"""

from __future__ import annotations

import base64
import contextlib
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import redis
from celery import Celery

from producer.client import TrainingClient
from producer.errors import ConfigurationError, ResultTimeoutError
from producer.events import InteractionData
from producer.keys import ModelKeys, marker_field
from producer.settings import Settings
from worker.devtools.stack import APP, node_name, start_worker, stop_processes, wait_for_workers
from worker.engine.batch import Job
from worker.engine.checkpoint import Checkpoint, ModelConfig
from worker.engine.mlp import Shape, init_params
from worker.store.model_store import Store

ACTIONS = ("click", "view", "purchase", "dismiss", "like", "skip")

#: The ``make_client`` fixture: ``make_client(redis_url, **settings)``.
ClientFactory = Callable[..., TrainingClient]


# -- /proc ------------------------------------------------------------------------------------------


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (``/proc/<pid>/task/*/children``)."""
    out: list[int] = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return out
    for tid in tasks:
        try:
            text = Path(f"/proc/{pid}/task/{tid}/children").read_text()
        except (FileNotFoundError, ProcessLookupError):
            continue
        out.extend(int(c) for c in text.split())
    return sorted(set(out))


def descendants(pid: int) -> list[int]:
    found: list[int] = []
    stack = [pid]
    while stack:
        for child in children(stack.pop()):
            if child not in found:
                found.append(child)
                stack.append(child)
    return found


def _stat_fields(pid: int) -> list[str] | None:
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    # The command name may hold spaces; everything after the last ')' is space-separated.
    return text[text.rindex(")") + 2 :].split()


def alive(pid: int) -> bool:
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z"


def pgid_of(pid: int) -> int | None:
    fields = _stat_fields(pid)
    return int(fields[2]) if fields else None


def rss_bytes(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0


def tree_rss(pid: int) -> int:
    """RSS of a worker: its main process and every pool child."""
    return sum(rss_bytes(p) for p in [pid, *descendants(pid)])


# -- waiting ----------------------------------------------------------------------------------------


def wait_until(pred: Callable[[], Any], timeout: float, what: str, interval: float = 0.05) -> Any:
    """Poll ``pred`` until it is truthy; AssertionError naming ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = pred()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


# -- workers ----------------------------------------------------------------------------------------


class Workers:
    """Worker processes this test started, on any Redis; all stopped by pid at ``close``."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []
        self.names: dict[int, str] = {}
        self.logs: dict[int, Path] = {}
        self._apps: dict[str, Celery] = {}
        self._known: dict[int, set[int]] = {}  # worker pid -> every descendant pid ever seen

    def start(
        self,
        count: int = 1,
        *,
        redis_url: str,
        env: dict[str, str] | None = None,
        concurrency: int = 1,
        pool: str = "prefork",
        app: str = APP,
        prefix: str = "w",
        timeout: float = 90.0,
        queues: Sequence[str] = (),
    ) -> list[subprocess.Popen[bytes]]:
        """``count`` workers of ``app``; returns once each answers a ping (and, with the prefork
        pool, has its pool children). Logs go to ``log_dir``. ``queues``: Celery's ``-Q``."""
        full_env = {
            "ITRAIN_REDIS_URL": redis_url,
            # One BLAS thread per process: on 2 cores, threaded BLAS in every pool child only
            # adds contention and makes the step time erratic.
            "OPENBLAS_NUM_THREADS": "1",
            "OMP_NUM_THREADS": "1",
            **(env or {}),
        }
        started = []
        for _ in range(count):
            name = f"{prefix}{len(self.procs) + 1}-{uuid.uuid4().hex[:6]}"
            log = self.log_dir / f"{name}.log"
            proc = start_worker(
                name, full_env, concurrency=concurrency, pool=pool, log=log, app=app, queues=queues
            )
            self.procs.append(proc)
            self.names[proc.pid] = node_name(name)
            self.logs[proc.pid] = log
            started.append(proc)
        # Wait for the ones just started: earlier ones may have been killed on purpose.
        self.wait_ready(redis_url, started, timeout)
        for proc in started:
            if pool == "prefork":
                wait_until(
                    lambda p=proc: len(children(p.pid)) >= concurrency, 30, f"pool children of {proc.pid}"
                )
            self.remember(proc)
        return started

    def app(self, redis_url: str) -> Celery:
        if redis_url not in self._apps:
            self._apps[redis_url] = TrainingClient(redis_url=redis_url).app
        return self._apps[redis_url]

    def wait_ready(self, redis_url: str, procs: Sequence[subprocess.Popen[bytes]], timeout: float) -> None:
        """Until each of ``procs`` answers a ping; AssertionError with the logs if one exits first
        or does not answer within ``timeout`` seconds."""
        names = [self.names[p.pid] for p in procs]
        try:
            wait_for_workers(self.app(redis_url), names=names, procs=procs, timeout=timeout)
        except ConfigurationError as exc:
            raise AssertionError(f"{exc}\n{self.tails()}") from None

    def assert_alive(self, procs: Sequence[subprocess.Popen[bytes]] | None = None) -> None:
        dead = [p.pid for p in (self.procs if procs is None else procs) if p.poll() is not None]
        assert not dead, f"worker process(es) {dead} exited; logs in {self.log_dir}"

    def remember(self, proc: subprocess.Popen[bytes]) -> None:
        self._known.setdefault(proc.pid, set()).update(descendants(proc.pid))

    def pool(self, proc: subprocess.Popen[bytes]) -> list[int]:
        pids = children(proc.pid)
        self._known.setdefault(proc.pid, set()).update(pids)
        return pids

    def log(self, proc: subprocess.Popen[bytes]) -> str:
        return self.logs[proc.pid].read_text(errors="replace")

    def tail(self, proc: subprocess.Popen[bytes], lines: int = 40) -> str:
        return "\n".join(self.log(proc).splitlines()[-lines:])

    def tails(self, lines: int = 25) -> str:
        return "\n".join(f"--- worker {p.pid} ---\n{self.tail(p, lines)}" for p in self.procs)

    def signal_group(self, proc: subprocess.Popen[bytes], sig: int) -> None:
        """Signal a worker's whole process group (main process and pool children)."""
        assert pgid_of(proc.pid) == proc.pid, "not a process group we started"
        self.remember(proc)
        os.killpg(proc.pid, sig)

    def kill_group(self, proc: subprocess.Popen[bytes]) -> None:
        self.signal_group(proc, signal.SIGKILL)
        proc.wait(20)
        members = self._known.get(proc.pid, set())
        wait_until(lambda: not any(alive(p) for p in members), 20, "killed pool children to exit")

    def close(self, timeout: float = 8.0) -> None:
        """Stop every worker still running: a warm shutdown (SIGTERM), all at once, then SIGKILL
        for those still running after ``timeout`` seconds. A warm shutdown takes ~2 s here; one
        whose Redis a test already stopped retries its connection until killed (20 s a test, at
        the former timeout). Tests that check the warm shutdown itself do it themselves."""
        live = [proc for proc in self.procs if proc.poll() is None]
        for proc in live:
            self.remember(proc)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGCONT)  # in case a test left it stopped
        stop_processes(live, timeout)
        # Pool children that outlived their worker: only pids we saw as its children, and only
        # while they are still in that worker's process group.
        for leader, members in self._known.items():
            for pid in members:
                if alive(pid) and pgid_of(pid) == leader:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
        for app in self._apps.values():
            app.close()


# -- models, events, results ------------------------------------------------------------------------


def create_model(client: redis.Redis, settings: Settings, *, name: str | None = None, **config: Any) -> str:
    """A new initialised model (keyword arguments are ``ModelConfig`` fields); its name."""
    name = name or f"m-{uuid.uuid4().hex[:12]}"
    Store(client, settings).create(name, Checkpoint.initial(ModelConfig.model_validate(config)), force=False)
    return name


def make_event(
    model: str = "default", i: int = 0, tag: str = "ev", *, labels: bool = False, **overrides: Any
) -> dict[str, Any]:
    """Event number ``i`` of a varied, deterministic sequence, as a plain dict: event id
    ``<tag>-<i>``, 101 users, every action with a default target, times spread over days, a
    context on two events in three; with ``labels``, an explicit scalar label on one in five.
    ``overrides`` replace fields."""
    event: dict[str, Any] = {
        "event_id": f"{tag}-{i}",
        "user_id": f"user-{i % 101}",
        "action_type": ACTIONS[i % len(ACTIONS)],
        "timestamp": 1_700_000_000 + 611.5 * i,
        "context": {"page": i % 7, "mobile": i % 2 == 0} if i % 3 else None,
        "model": model,
    }
    if labels and i % 5 == 0:
        event["label"] = round((i % 11) / 10, 2)
    event.update(overrides)
    return event


def make_events(
    model: str, n: int, tag: str = "ev", *, start: int = 0, labels: bool = False, **overrides: Any
) -> list[dict[str, Any]]:
    """Events ``start`` .. ``start + n - 1`` of ``make_event``'s sequence."""
    return [make_event(model, i, tag, labels=labels, **overrides) for i in range(start, start + n)]


def make_interaction(**overrides: Any) -> InteractionData:
    """``make_event(**overrides)`` validated, for tests of the engine's pure functions."""
    return InteractionData.model_validate(make_event(**overrides))


def make_jobs(model: str, tag: str, n: int) -> list[Job]:
    """A worker's jobs (task ``task-<tag>-<i>``) for events 0 .. n - 1 of ``make_event``'s
    sequence: what a ``Trainer`` trains."""
    return [Job(f"task-{tag}-{i}", make_interaction(model=model, i=i, tag=tag)) for i in range(n)]


def statuses(results: Iterable[Any]) -> Counter[str]:
    return Counter(r["status"] if isinstance(r, dict) else "FAILURE" for r in results)


def wait_results(
    client: TrainingClient,
    handles: Sequence[Any],
    timeout: float,
    workers: Workers | None = None,
    labels: Sequence[str] | None = None,
) -> list[Any]:
    """Every handle's result; on timeout an AssertionError with the queue state, the labels of
    the pending handles (when given) and the worker logs."""
    try:
        return client.wait_all(handles, timeout=timeout, poll=0.05)
    except ResultTimeoutError as exc:
        r = client._results
        state = (
            f"queue={r.llen(client.settings.queue)} unacked={r.hlen('unacked')} "
            f"unacked_index={r.zcard('unacked_index')}"
        )
        if labels is not None:
            raw = r.mget([h.key for h in handles])
            pending = Counter(label for label, value in zip(labels, raw, strict=True) if value is None)
            state += f" pending by kind: {dict(pending)}"
        logs = workers.tails() if workers else ""
        raise AssertionError(f"{exc}; {state}\n{logs}") from None


def send_from_threads(
    client: Any, events: Sequence[dict[str, Any]], rate: float, threads: int = 4
) -> list[Any]:
    """``train_step`` for each event, at ``rate`` in all from ``threads`` threads (each its share,
    as a service's request threads would); the handles."""
    from worker.devtools.pacing import send_paced

    shares = [list(events[k::threads]) for k in range(threads)]
    out: list[list[Any]] = [[] for _ in range(threads)]

    def run(k: int) -> None:
        out[k], _ = send_paced(
            shares[k], lambda part: [client.train_step(part[0])], rate=rate / threads, size=1
        )

    pool = [threading.Thread(target=run, args=(k,)) for k in range(threads)]
    for thread in pool:
        thread.start()
    for thread in pool:
        thread.join()
    return [h for part in out for h in part]


def model_state(client: redis.Redis, model: str) -> dict[str, int]:
    keys = ModelKeys(model)
    version, step = client.hmget(keys.ckpt, ["version", "step"])
    return {"version": int(version), "step": int(step)}


def check_each_event_once(client: redis.Redis, model: str, event_ids: Sequence[str]) -> dict[str, Any]:
    """The exactly-once evidence, read from Redis itself.

    * every trained event has a done marker holding the step that trained it (written by the
      fenced commit), and the markers of ``event_ids`` are exactly the steps 1..step, each once:
      no event counted twice, no commit lost;
    * the history (``ITRAIN_HISTORY_MAX`` set >= the number of events) lists each step once and
      each event once.

    Returns ``{"step", "marked", "markers"}`` (event id -> step) for further checks.
    """
    keys = ModelKeys(model)
    step = model_state(client, model)["step"]
    gen = int(client.hget(keys.ckpt, "gen") or 0)
    wanted = {marker_field(e): e for e in event_ids}
    pairs: list[tuple[str, int]] = []  # from every marker slot: an event marked twice shows twice
    for key in client.scan_iter(match=keys.done_prefix(gen) + "*", count=1000):
        for field, value in client.hgetall(key).items():
            if field in wanted:
                # "step" or "step:<digest of the result id>" (worker.store.markers)
                pairs.append((wanted[field], int(value.partition(b":")[0])))
    markers = dict(pairs)
    marked_steps = sorted(step for _, step in pairs)
    assert marked_steps == list(range(1, step + 1)), (
        f"done markers do not cover steps 1..{step} once each: {len(marked_steps)} markers, "
        f"{len(set(marked_steps))} distinct, max {max(marked_steps, default=0)}"
    )
    history = [_json(e) for e in client.lrange(keys.history, 0, -1)]
    if len(history) >= step:
        hist_steps = sorted(h["step"] for h in history)
        hist_ids = [h["event_id"] for h in history]
        assert hist_steps == list(range(1, step + 1)), "history steps are not 1..step, each once"
        assert len(set(hist_ids)) == len(hist_ids), "an event appears twice in the training history"
        for h in history:
            assert markers.get(h["event_id"]) == h["step"], f"history and marker disagree for {h}"
    return {"step": step, "marked": len(markers), "markers": markers}


def _json(raw: bytes) -> Any:
    import orjson

    return orjson.loads(raw)


def raw_event(model: str, event_id: str, **overrides: Any) -> dict[str, Any]:
    """A minimal valid event as a plain dict, for messages built by hand."""
    return {
        "event_id": event_id,
        "user_id": "u1",
        "action_type": "click",
        "timestamp": time.time(),
        "model": model,
        **overrides,
    }


def http_get(url: str, auth: tuple[str, str] | None = None, timeout: float = 5.0) -> tuple[int, bytes]:
    """GET ``url``, with basic auth when given: (status, body). An error status is returned, not
    raised; a connection error is (``OSError``)."""
    request = urllib.request.Request(url)
    if auth:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status), bytes(response.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())


def predictions(trainer: Any, model: str, probes: Sequence[InteractionData]) -> list[list[float]]:
    """What ``trainer`` predicts for each probe event, as if sent for ``model``."""
    return [trainer.predict(e.model_copy(update={"model": model}))["prediction"] for e in probes]


def wait_http(
    url: str, proc: subprocess.Popen[bytes], timeout: float = 30.0, auth: tuple[str, str] | None = None
) -> tuple[int, bytes]:
    """GET ``url`` once the server ``proc`` started answers: (status, body). AssertionError when
    ``proc`` exits first or nothing answers within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return http_get(url, auth)
        except OSError:
            assert proc.poll() is None, f"the server for {url} exited with {proc.returncode}"
            assert time.monotonic() < deadline, f"{url} did not answer within {timeout:g} s"
            time.sleep(0.2)


def evidence_env(visibility: int) -> dict[str, str]:
    """Worker settings for tests that read the exactly-once evidence: dead workers' messages back
    after ``visibility`` seconds, markers kept longer than that, every step kept in the history."""
    return {
        "ITRAIN_VISIBILITY_TIMEOUT": str(visibility),
        "ITRAIN_DEDUPE_TTL": "600",
        "ITRAIN_HISTORY_MAX": "100000",
        "ITRAIN_LOG_EVERY": "1000",
    }


def problem(
    inputs: int, hidden: int, outputs: int, batch: int, seed: int = 0
) -> tuple[Shape, np.ndarray, np.ndarray, np.ndarray]:
    """An SGD test problem: random weights (non-zero biases too), inputs in [-1, 1] and targets
    in [0, 1]."""
    rng = np.random.default_rng(seed)
    shape = Shape(inputs, hidden, outputs)
    theta = init_params(shape, seed) + rng.normal(0.0, 0.3, shape.size)
    X = rng.uniform(-1.0, 1.0, (batch, inputs))
    T = rng.uniform(0.0, 1.0, (batch, outputs))
    return shape, theta, X, T


# -- TLS ----------------------------------------------------------------------------------------------


def make_certificates(directory: Path) -> None:
    """A private CA and a server certificate for 127.0.0.1 and localhost (openssl)."""

    def run(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)

    run(
        "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.crt",
        "-days", "2", "-subj", "/CN=itrain-test-ca",
    )  # fmt: skip
    (directory / "ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    run(
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        "/CN=localhost",
    )
    run(
        "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", "server.crt", "-days", "2", "-extfile", "ext",
    )  # fmt: skip
