"""docker-compose.yml's services run as local processes (no Docker engine here): the worker's
command trains, the init command is repeatable, Flower's command serves its API behind auth."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from base64 import b64encode
from pathlib import Path

import pytest
import yaml

from producer.client import TrainingClient
from worker.embedded_redis import free_port
from worker.stack import stop_process, wait_for_workers

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = yaml.safe_load((ROOT / "docker-compose.yml").read_text())


def _expand(text: str, env: dict[str, str]) -> str:
    """Compose's ${VAR}, ${VAR:-default} and ${VAR:?error} substitution."""

    def sub(m: re.Match[str]) -> str:
        name, op, arg = m.group(1), m.group(2), m.group(3)
        if env.get(name):
            return env[name]
        if op == ":-":
            return arg
        raise AssertionError(f"${{{name}}} is required: {arg}")

    return re.sub(r"\$\{(\w+)(?:(:-|:\?)([^}]*))?\}", sub, text)


def _service(name: str, redis_url: str, extra_env: dict[str, str] | None = None) -> tuple[list[str], dict]:
    svc = COMPOSE["services"][name]
    env = {**os.environ, **{k: str(v) for k, v in svc.get("environment", {}).items()}, **(extra_env or {})}
    # The compose network's "redis" host is our private server here.
    env["ITRAIN_REDIS_URL"] = redis_url
    command = [_expand(str(part), env) for part in svc["command"]]
    if command[0] == "celery":
        command = [sys.executable, "-m", "celery", *command[1:]]
    elif command[0] == "itrain":
        command = [str(Path(sys.executable).parent / "itrain"), *command[1:]]
    return command, env


def test_init_service_is_repeatable(redis_url: str, redis_client) -> None:
    # Given the init service's command
    command, env = _service("init", redis_url)
    assert command[command.index("--model") + 1] == "default"
    model = f"compose-{uuid.uuid4().hex[:8]}"  # not "default": other tests share this server
    command[command.index("--model") + 1] = model
    # When it runs twice, as `docker compose up` after a restart would
    first = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, timeout=60)
    version = redis_client.hget(f"itrain:{{{model}}}:ckpt", "version")
    second = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, timeout=60)
    # Then both succeed and the second leaves the model alone
    assert first.returncode == 0, first.stderr
    assert second.returncode == 0, second.stderr
    assert redis_client.hget(f"itrain:{{{model}}}:ckpt", "version") == version == b"1"


def test_worker_service_command_trains(redis_url: str, make_model, tmp_path: Path) -> None:
    # Given two processes started with the worker service's command (as --scale worker=2 would)
    command, env = _service("worker", redis_url)
    command = [*command, "--hostname", "compose-%i@%h"]
    procs = []
    for i in range(2):
        log = open(tmp_path / f"w{i}.log", "wb")  # noqa: SIM115 - the child owns it
        cmd = [c.replace("%i", str(i)) for c in command]
        procs.append(
            subprocess.Popen(
                cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        )
    model = make_model()
    try:
        with TrainingClient(redis_url=redis_url) as client:
            names = wait_for_workers(client.app, 2, timeout=90)
            assert sum(n.startswith("compose-") for n in names) == 2
            # When events are sent
            results = client.wait_all(
                client.train_many(
                    [
                        {"user_id": f"u{i}", "action_type": "click", "timestamp": time.time(), "model": model}
                        for i in range(50)
                    ]
                ),
                timeout=60,
            )
        # Then they are trained
        assert sorted(r["step"] for r in results) == list(range(1, 51))
    finally:
        for p in procs:
            stop_process(p)


def test_flower_service_requires_auth(redis_url: str, tmp_path: Path) -> None:
    # Given Flower started with the flower service's command, on a free port
    password = uuid.uuid4().hex
    command, env = _service("flower", redis_url, {"FLOWER_PASSWORD": password})
    port = free_port()
    command = [
        c.replace("--port=5555", f"--port={port}").replace("--address=0.0.0.0", "--address=127.0.0.1")
        for c in command
    ]
    log = open(tmp_path / "flower.log", "wb")  # noqa: SIM115 - the child owns it
    proc = subprocess.Popen(
        command, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}/api/workers"
    try:
        deadline = time.monotonic() + 60
        status = None
        while time.monotonic() < deadline and status is None:
            try:
                urllib.request.urlopen(url, timeout=2)
                status = 200
            except urllib.error.HTTPError as exc:
                status = exc.code
            except OSError:
                time.sleep(0.3)
        # Then without credentials it refuses, with them it answers
        assert status == 401
        token = b64encode(f"itrain:{password}".encode()).decode()
        req = urllib.request.Request(url, headers={"Authorization": f"Basic {token}"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            assert resp.status == 200
    finally:
        stop_process(proc)


@pytest.mark.parametrize("name", ["worker", "flower"])
def test_services_have_no_fixed_names_or_public_ports(name: str) -> None:
    svc = COMPOSE["services"][name]
    assert "container_name" not in svc
    for port in svc.get("ports", []):
        assert str(port).startswith("127.0.0.1:"), "published ports bind to the host's loopback only"
