"""docker-compose.yml: its structure, and each service's command run as a local process.

No Docker engine runs here, so the file is checked by parsing it (PyYAML) and by running the
worker, init and Flower commands it names against the private redis-server, with the service URL
swapped for the private one. Nothing connects to a Redis the tests did not start.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis

from producer.celery_config import make_celery
from producer.client import TrainingClient
from producer.errors import ConfigurationError
from producer.keys import MODELS, ModelKeys
from producer.settings import Settings
from tests.helpers import http_get, make_event, wait_http
from worker.devtools.embedded_redis import find_redis_server, free_port
from worker.devtools.stack import node_name, start_process, stop_process, wait_for_workers

yaml = pytest.importorskip("yaml")

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
BIN = Path(sys.executable).parent
APP_SERVICES = ("worker", "flower")


# -- reading the file -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def services() -> dict[str, Any]:
    assert COMPOSE.exists(), f"{COMPOSE} is missing"
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict), "docker-compose.yml must be a mapping"
    assert isinstance(data.get("services"), dict), "docker-compose.yml has no services mapping"
    return data["services"]


def command_of(service: Mapping[str, Any]) -> list[str]:
    cmd = service.get("command")
    if cmd is None:
        return []
    if isinstance(cmd, str):
        return shlex.split(cmd)
    return [str(part) for part in cmd]


def env_of(service: Mapping[str, Any]) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


_VAR = re.compile(r"\$(?:\$|\{(?P<braced>[^}]*)\}|(?P<plain>[A-Za-z_][A-Za-z0-9_]*))")


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """Compose's variable substitution: $$, $VAR, ${VAR}, ${VAR:-d}, ${VAR-d}, ${VAR:?e}, ${VAR?e}."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        if m.group("plain"):
            return env.get(m.group("plain"), "")
        expr = m.group("braced")
        name, op, arg = re.match(r"([A-Za-z_][A-Za-z0-9_]*)(:?[-?]?)(.*)", expr).groups()  # type: ignore[union-attr]
        value = env.get(name)
        empty = value is None or (op.startswith(":") and value == "")
        if op.endswith("-") and empty:
            return arg
        if op.endswith("?") and empty:
            raise ValueError(f"required variable {name} is not set: {arg}")
        return value or ""

    return _VAR.sub(sub, text)


def _set_option(cmd: list[str], option: str, value: str) -> list[str]:
    """``cmd`` with ``option`` (as ``--opt=v`` or ``--opt v``) set to ``value``, added if absent."""
    out: list[str] = []
    skip = False
    found = False
    for i, part in enumerate(cmd):
        if skip:
            skip = False
            continue
        if part == option and i + 1 < len(cmd):
            out += [option, value]
            skip = found = True
        elif part.startswith(option + "="):
            out.append(f"{option}={value}")
            found = True
        else:
            out.append(part)
    return out if found else [*out, f"{option}={value}"]


def _local(cmd: list[str]) -> list[str]:
    """The command with the container's entry points replaced by this virtualenv's."""
    if cmd[0] == "celery":
        return [sys.executable, "-m", "celery", *cmd[1:]]
    if cmd[0] == "itrain":
        return [str(BIN / "itrain"), *cmd[1:]]
    return cmd


#: The variables compose requires (``:?``), as an operator sets them.
COMPOSE_VARS = {"REDIS_PASSWORD": "compose-test-pw", "FLOWER_PASSWORD": "compose-flower-pw"}


def _local_env(
    service: Mapping[str, Any], redis_url: str, queue: str, extra: Mapping[str, str]
) -> dict[str, str]:
    env = {k: interpolate(v, {**COMPOSE_VARS, **extra}) for k, v in env_of(service).items()}
    env["ITRAIN_REDIS_URL"] = redis_url
    env["ITRAIN_QUEUE"] = queue  # a queue of its own: it takes no other test's messages
    for var in ("ITRAIN_BROKER_URL", "ITRAIN_RESULT_BACKEND", "ITRAIN_STORE_URL"):
        env.pop(var, None)
    return {**os.environ, **env}


# -- structure --------------------------------------------------------------------------------


def test_services_redis_worker_flower(services: dict[str, Any]) -> None:
    assert {"redis", "worker", "flower"} <= set(services)
    redis_svc = services["redis"]
    assert str(redis_svc.get("image", "")).startswith("redis") or command_of(redis_svc)[:1] == [
        "redis-server"
    ]


def test_worker_command_is_the_celery_worker(services: dict[str, Any]) -> None:
    assert command_of(services["worker"])[:4] == ["celery", "-A", "worker", "worker"]


def test_flower_command_is_celery_flower_with_auth(services: dict[str, Any]) -> None:
    cmd = command_of(services["flower"])
    assert cmd[:4] == ["celery", "-A", "worker", "flower"]
    env = env_of(services["flower"])
    assert any(p.startswith(("--basic-auth", "--auth")) for p in cmd) or "FLOWER_BASIC_AUTH" in env, (
        "Flower must not be reachable without authentication"
    )


def test_worker_is_scalable(services: dict[str, Any]) -> None:
    worker = services["worker"]
    assert "container_name" not in worker, "a fixed container_name prevents --scale worker=N"
    assert "hostname" not in worker, "a fixed hostname gives every replica the same Celery node name"
    for port in worker.get("ports") or []:
        if isinstance(port, dict):
            assert not port.get("published"), f"worker publishes host port {port}"
        else:
            assert ":" not in str(port), f"worker publishes a fixed host port: {port!r}"
    cmd = command_of(worker)
    for i, part in enumerate(cmd):
        name = None
        if part in ("-n", "--hostname") and i + 1 < len(cmd):
            name = cmd[i + 1]
        elif part.startswith("--hostname="):
            name = part.split("=", 1)[1]
        if name is not None:
            assert "%h" in name or "%n" in name, f"fixed node name {name!r} clashes across replicas"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_services_point_at_the_redis_service(services: dict[str, Any], name: str) -> None:
    service = services[name]
    env = env_of(service)
    assert "ITRAIN_REDIS_URL" in env, f"{name} sets no ITRAIN_REDIS_URL"
    url = urlsplit(interpolate(env["ITRAIN_REDIS_URL"], COMPOSE_VARS))
    assert url.scheme in ("redis", "rediss")
    assert url.password == COMPOSE_VARS["REDIS_PASSWORD"], f"{name} does not give Redis its password"
    assert url.hostname == "redis", f"{name} points at {url.hostname!r}, not the redis service"
    # no role override pointing elsewhere
    for var in ("ITRAIN_BROKER_URL", "ITRAIN_RESULT_BACKEND", "ITRAIN_STORE_URL"):
        if var in env:
            assert urlsplit(interpolate(env[var], COMPOSE_VARS)).hostname == "redis"
    depends = service.get("depends_on") or []
    assert "redis" in depends, f"{name} does not depend on redis"


def test_services_that_build_have_a_dockerfile(services: dict[str, Any]) -> None:
    for name, service in services.items():
        build = service.get("build")
        if build is None:
            continue
        context = build if isinstance(build, str) else build.get("context", ".")
        dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
        assert (ROOT / context / dockerfile).is_file(), f"{name}: {context}/{dockerfile} is missing"


# -- the commands, run locally ----------------------------------------------------------------


def test_init_command_runs_and_is_repeatable(services: dict[str, Any], redis_url: str) -> None:
    if "init" not in services:
        pytest.skip("no init service")
    model = f"compose-{uuid.uuid4().hex[:10]}"
    cmd = _set_option(_local(command_of(services["init"])), "--model", model)
    env = _local_env(services["init"], redis_url, "unused", {})
    for _ in range(2):  # a second `docker compose up` must not fail on the existing model
        proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
    r = redis.Redis.from_url(redis_url)
    try:
        assert r.sismember(MODELS, model)
    finally:
        r.close()


def test_worker_command_runs_and_trains(
    services: dict[str, Any], redis_url: str, make_model, tmp_path: Path
) -> None:
    model = make_model()
    queue = f"compose-{uuid.uuid4().hex[:8]}"
    node = f"compose-{uuid.uuid4().hex[:6]}"
    # the compose command, plus a node name so this test can find its worker
    cmd = [*_local(command_of(services["worker"])), "--hostname", f"{node}@%h"]
    log = tmp_path / "worker.log"
    proc = start_process(cmd, _local_env(services["worker"], redis_url, queue, {}), log)
    try:
        app = make_celery(Settings(redis_url=redis_url), main="itrain-test-ping")
        try:
            wait_for_workers(app, names=[node_name(node)], procs=[proc], timeout=60)
        except ConfigurationError as exc:
            pytest.fail(f"{exc}; see {log}")
        finally:
            app.close()
        with TrainingClient(settings=Settings(redis_url=redis_url, queue=queue)) as client:
            result = client.train_step(make_event(model)).get(timeout=60)
        assert result["status"] == "trained"
        assert result["step"] == 1
    finally:
        stop_process(proc)


def test_flower_command_runs_and_requires_auth(
    services: dict[str, Any], redis_url: str, tmp_path: Path
) -> None:
    user, password = "tester", f"pw-{uuid.uuid4().hex[:8]}"
    variables = {"FLOWER_USER": user, "FLOWER_PASSWORD": password}
    port = free_port()
    cmd = [interpolate(p, variables) for p in command_of(services["flower"])]
    cmd = _set_option(_set_option(_local(cmd), "--port", str(port)), "--address", "127.0.0.1")
    log = tmp_path / "flower.log"
    env = _local_env(services["flower"], redis_url, f"compose-{uuid.uuid4().hex[:8]}", variables)
    proc = start_process(cmd, env, log)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        status = None
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"flower exited; see {log}"
            try:
                status = http_get(base + "/api/tasks")[0]
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.2)
        assert status == 401, f"flower answered {status} without credentials"
        assert http_get(base + "/api/tasks", (user, "wrong"))[0] == 401
        assert http_get(base + "/api/tasks", (user, password))[0] == 200
    finally:
        stop_process(proc)


# -- the monitoring profile -------------------------------------------------------------------

MONITORING = ("exporter", "prometheus", "grafana")
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "itrain.json"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"


def test_monitoring_services_are_behind_their_profile(services: dict[str, Any]) -> None:
    for name in MONITORING:
        assert services[name].get("profiles") == ["monitoring"], name
    for name in ("redis", "init", "worker", "flower"):
        assert "profiles" not in services[name], f"{name} must start with a plain `up`"
    assert command_of(services["exporter"])[:2] == ["itrain", "exporter"]
    assert not services["exporter"].get("ports"), "the exporter is scraped over the compose network"


def test_prometheus_scrapes_the_exporter_service(services: dict[str, Any]) -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    targets = [t for job in config["scrape_configs"] for sc in job["static_configs"] for t in sc["targets"]]
    cmd = command_of(services["exporter"])
    port = cmd[cmd.index("--port") + 1]
    address = cmd[cmd.index("--address") + 1]
    assert address == "0.0.0.0", "inside its container the exporter must listen beyond loopback"
    assert targets == [f"exporter:{port}"]
    mounts = [str(v) for v in services["prometheus"]["volumes"]]
    assert f"./{PROMETHEUS.relative_to(ROOT)}:/etc/prometheus/prometheus.yml:ro" in mounts
    grafana_mounts = [str(v).split(":")[0] for v in services["grafana"]["volumes"]]
    for path in grafana_mounts:
        assert (ROOT / path).exists(), path


def test_every_metric_the_dashboard_queries_is_served(make_model, redis_client) -> None:
    from prometheus_client import generate_latest
    from prometheus_client.registry import CollectorRegistry

    from worker.ops.exporter import ItrainCollector

    # Given what the exporter serves for a model that has counted an action
    redis_client.hincrby(ModelKeys(make_model()).actions, "click", 1)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(ItrainCollector(redis_client, ["itrain"]))
    # (a sample's name, or a family's from its HELP line: a fresh model has no loss yet)
    page = generate_latest(registry).decode()
    served = set(re.findall(r"^(?:# HELP )?(itrain_[a-z_]+)", page, re.MULTILINE))
    # When every query of the dashboard is read
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    exprs += [dashboard["templating"]["list"][0]["definition"]]
    queried = {name for e in exprs for name in re.findall(r"\b(itrain_[a-z_]+)", e)}
    # Then each is a metric the exporter serves, and the dashboard covers what operators watch
    assert queried, "the dashboard queries nothing"
    assert queried <= served, f"not served: {sorted(queried - served)}"
    for needed in (
        "loss_ema",
        "interactions_total",
        "failures_total",
        "lock_wait",
        "lock_hold",
        "queue",
        "eval_logloss",
    ):
        assert any(needed in name for name in queried), needed


def test_exporter_command_runs_as_compose_would(services: dict[str, Any], redis_url: str) -> None:
    port = str(free_port())
    cmd = _set_option(_set_option(command_of(services["exporter"]), "--port", port), "--address", "127.0.0.1")
    proc = start_process(_local(cmd), _local_env(services["exporter"], redis_url, "itrain", {}))
    try:
        status, body = wait_http(f"http://127.0.0.1:{port}/metrics", proc)
        assert status == 200
        assert b"itrain_up 1.0" in body
    finally:
        stop_process(proc)


def test_redis_requires_the_password_every_service_connects_with(
    services: dict[str, Any], tmp_path: Path
) -> None:
    """The redis service's own command (requirepass from REDIS_PASSWORD) run as a local process:
    a client without the password is refused, and the URL the services get is let in."""
    port = free_port()
    cmd = [interpolate(part, COMPOSE_VARS) for part in command_of(services["redis"])]
    assert cmd[0] == "redis-server"
    cmd = [find_redis_server(), *cmd[1:], "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        service_url = interpolate(env_of(services["worker"])["ITRAIN_REDIS_URL"], COMPOSE_VARS)
        local = service_url.replace("@redis:6379", f"@127.0.0.1:{port}")
        client = redis.Redis.from_url(local, socket_timeout=5)
        deadline = time.monotonic() + 20
        while True:
            try:
                assert client.ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "the redis service's command did not start"
                time.sleep(0.1)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port, socket_timeout=5).ping()
        # the healthcheck's redis-cli authenticates through REDISCLI_AUTH, set from the same variable
        auth = interpolate(env_of(services["redis"])["REDISCLI_AUTH"], COMPOSE_VARS)
        assert auth == COMPOSE_VARS["REDIS_PASSWORD"]
        assert client.info("memory")["maxmemory_policy"] == "noeviction"
    finally:
        proc.terminate()
        proc.wait(10)


def test_long_running_services_have_healthchecks(services: dict[str, Any]) -> None:
    for name in ("redis", "worker", "flower", "exporter"):
        assert services[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"


# -- the ha profile ---------------------------------------------------------------------------
# No engine runs here and the service names do not resolve, so the profile is checked by reading it,
# and its sentinel command is run locally: once to make its configuration (in a directory standing
# for its volume), then that configuration, with the master's service name mapped to 127.0.0.1,
# read by a real sentinel monitoring the primary's own command run as a local process.

HA_DATA = ("redis-primary", "redis-replica-1", "redis-replica-2")
HA_SENTINELS = ("sentinel-1", "sentinel-2", "sentinel-3")
HA_APPS = ("init-ha", "worker-ha", "flower-ha", "exporter-ha")


def _option(cmd: list[str], option: str) -> list[str]:
    """The values after each ``option`` in ``cmd`` (``--replicaof h p`` gives ``[h, p]``)."""
    i = cmd.index(option)
    values = []
    for part in cmd[i + 1 :]:
        if part.startswith("--"):
            break
        values.append(part)
    return values


def _sentinel_conf(services: dict[str, Any], name: str, folder: Path) -> list[str]:
    """Run the sentinel service's script locally with its volume at ``folder`` and the server
    started by ``exec`` left out: the configuration lines it leaves there."""
    cmd = command_of(services[name])
    assert cmd[:2] == ["sh", "-c"], f"{name}: expected a shell script that makes the configuration"
    script = interpolate(cmd[2], COMPOSE_VARS).replace("/data", str(folder))
    script = script.replace("exec redis-server", ": redis-server")  # make the file, start nothing
    subprocess.run(["sh", "-c", script], check=True, timeout=30)
    return (folder / "sentinel.conf").read_text().splitlines()


def _volume_target(service: Mapping[str, Any]) -> dict[str, str]:
    """Mount target -> source of each volume, read-only ones left out."""
    found = {}
    for volume in service.get("volumes") or []:
        source, target, *mode = str(volume).split(":")
        if mode != ["ro"]:
            found[target] = source
    return found


def test_ha_services_are_behind_their_profile(services: dict[str, Any]) -> None:
    for name in (*HA_DATA, *HA_SENTINELS, *HA_APPS):
        assert services[name].get("profiles") == ["ha"], name


def test_ha_data_servers_replicate_the_primary_and_announce_their_names(services: dict[str, Any]) -> None:
    for name in HA_DATA:
        cmd = [interpolate(part, COMPOSE_VARS) for part in command_of(services[name])]
        assert cmd[0] == "redis-server", name
        password = COMPOSE_VARS["REDIS_PASSWORD"]
        # any of them may be the master (requirepass) or follow one (masterauth) after a failover
        assert _option(cmd, "--requirepass") == [password], name
        assert _option(cmd, "--masterauth") == [password], name
        assert _option(cmd, "--maxmemory-policy") == ["noeviction"], name
        assert _option(cmd, "--replica-announce-ip") == [name], f"{name} must announce its service name"
        assert "/data" in _volume_target(services[name]), f"{name} keeps no data"
        if name == "redis-primary":
            assert "--replicaof" not in cmd
        else:
            assert _option(cmd, "--replicaof") == ["redis-primary", "6379"], name


def test_ha_sentinels_make_a_writable_config_with_hostnames(services: dict[str, Any], tmp_path: Path) -> None:
    for name in HA_SENTINELS:
        # Given the sentinel's configuration file, made by its own command in its volume
        assert "/data" in _volume_target(services[name]), f"{name}: its config dir is not a writable volume"
        folder = tmp_path / name
        folder.mkdir()
        lines = _sentinel_conf(services, name, folder)
        # Then it resolves and announces hostnames (before the monitor line, which names a host)
        assert "sentinel resolve-hostnames yes" in lines, name
        assert "sentinel announce-hostnames yes" in lines, name
        monitor = next(i for i, line in enumerate(lines) if line.startswith("sentinel monitor "))
        assert lines.index("sentinel resolve-hostnames yes") < monitor, name
        _, _, group, host, port, quorum = lines[monitor].split()
        assert (group, host, port) == ("itrain", "redis-primary", "6379"), name
        assert 1 < int(quorum) <= len(HA_SENTINELS), name
        assert f"sentinel auth-pass itrain {COMPOSE_VARS['REDIS_PASSWORD']}" in lines, name
        assert "dir /data".replace("/data", str(folder)) in lines, name
        # And a second start keeps the file the sentinel rewrote (it knows the master of now)
        (folder / "sentinel.conf").write_text("rewritten\n")
        assert _sentinel_conf(services, name, folder) == ["rewritten"], name


def test_ha_sentinel_config_runs_on_a_real_sentinel(services: dict[str, Any], tmp_path: Path) -> None:
    # Given the primary's own command and a sentinel's generated configuration, run locally with the
    # primary's service name mapped to 127.0.0.1
    port, sentinel_port = free_port(), free_port()
    cmd = [interpolate(part, COMPOSE_VARS) for part in command_of(services["redis-primary"])]
    primary = subprocess.Popen(
        [find_redis_server(), *cmd[1:], "--port", str(port), "--bind", "127.0.0.1", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    folder = tmp_path / "sentinel"
    folder.mkdir()
    lines = _sentinel_conf(services, "sentinel-1", folder)
    local = [
        line.replace("redis-primary 6379", f"127.0.0.1 {port}").replace("port 26379", f"port {sentinel_port}")
        for line in lines
    ]
    (folder / "sentinel.conf").write_text("\n".join([*local, "bind 127.0.0.1"]) + "\n")
    sentinel = subprocess.Popen(
        [find_redis_server(), str(folder / "sentinel.conf"), "--sentinel"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        # When the sentinel has read it
        client = redis.Redis(port=sentinel_port, socket_timeout=5, decode_responses=True)
        deadline = time.monotonic() + 30
        while True:
            try:
                master = client.execute_command("SENTINEL", "MASTER", "itrain")
                break
            except redis.ConnectionError:
                assert sentinel.poll() is None, "the sentinel refused its configuration"
                assert time.monotonic() < deadline, "the sentinel did not start"
                time.sleep(0.1)
        # Then it monitors the primary, logged in with the password, and kept its hostname settings
        fields = master if isinstance(master, dict) else dict(zip(master[::2], master[1::2], strict=False))
        assert int(fields["port"]) == port
        # (a sentinel names its links to the master with CLIENT SETNAME, refused before AUTH)
        server = redis.Redis(port=port, password=COMPOSE_VARS["REDIS_PASSWORD"], socket_timeout=5)

        def logged_in() -> bool:
            return any(str(c.get("name", "")).startswith("sentinel-") for c in server.client_list())

        deadline = time.monotonic() + 30
        while not logged_in():
            assert time.monotonic() < deadline, "the sentinel cannot log in to the primary"
            time.sleep(0.1)
        server.close()
        assert client.execute_command("SENTINEL", "CONFIG", "GET", "resolve-hostnames") == {
            "resolve-hostnames": "yes"
        }
        assert client.execute_command("SENTINEL", "CONFIG", "GET", "announce-hostnames") == {
            "announce-hostnames": "yes"
        }
    finally:
        for proc in (sentinel, primary):
            proc.terminate()
            proc.wait(10)


@pytest.mark.parametrize("name", HA_APPS)
def test_ha_apps_use_the_sentinel_url_and_the_master_name(services: dict[str, Any], name: str) -> None:
    from producer.sentinel import parse_sentinel_url

    env = env_of(services[name])
    url = parse_sentinel_url(interpolate(env["ITRAIN_REDIS_URL"], COMPOSE_VARS))
    # every sentinel service, with the data servers' password
    assert set(url.sentinels) == {(s, 26379) for s in HA_SENTINELS}, name
    assert url.password == COMPOSE_VARS["REDIS_PASSWORD"], name
    # the master's name is the one the sentinels monitor
    with_group = [
        line for line in command_of(services["sentinel-1"])[2].splitlines() if "sentinel monitor" in line
    ]
    assert env["ITRAIN_SENTINEL_MASTER"] in with_group[0].split(), name
    for var in ("ITRAIN_BROKER_URL", "ITRAIN_RESULT_BACKEND", "ITRAIN_STORE_URL"):
        assert var not in env, f"{name}: {var} would point a role elsewhere"
    assert set(HA_SENTINELS) <= set(services[name].get("depends_on") or []), name
    plain = name.removesuffix("-ha")
    assert command_of(services[name]) == command_of(services[plain]), f"{name} runs other than {plain}"


def test_ha_flower_publishes_another_host_port(services: dict[str, Any]) -> None:
    ports = [str(p) for p in services["flower-ha"].get("ports") or []]
    assert ports, "flower-ha publishes no port"
    assert all(p.startswith("127.0.0.1:") for p in ports), "Flower is published on the loopback only"
    assert not set(ports) & {str(p) for p in services["flower"].get("ports") or []}
