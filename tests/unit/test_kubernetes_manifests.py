"""deploy/kubernetes: the worker's Deployment and its KEDA autoscaling, held to the project.

No cluster runs here: the files are parsed (PyYAML) and compared with what they stand for. The
Deployment runs the compose file's worker command with its health check, and every ``ITRAIN_*``
name in the files is a setting. The ScaledObject scales that Deployment with one trigger per
queue the Deployment's environment makes the worker consume, each on the Redis list that queue's
messages wait in: the key the worker's transport waits on, which is the key producers push to.
"""

from __future__ import annotations

import os
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from producer.publishing import push_commands
from producer.settings import Settings
from worker.consume.transport import Channel

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "deploy" / "kubernetes"
WORKER = KUBERNETES / "worker.yaml"
AUTOSCALING = KUBERNETES / "autoscaling.yaml"
COMPOSE = ROOT / "docker-compose.yml"

SETTING_NAMES = {f"ITRAIN_{name.upper()}" for name in Settings.model_fields}


# -- reading the files ----------------------------------------------------------------------------


def _documents(path: Path) -> dict[str, dict[str, Any]]:
    """The file's objects by kind (one of each kind per file)."""
    found: dict[str, dict[str, Any]] = {}
    for doc in yaml.safe_load_all(path.read_text()):
        if doc is None:
            continue
        assert doc["kind"] not in found, f"{path.name} has two objects of kind {doc['kind']}"
        found[doc["kind"]] = doc
    return found


@pytest.fixture(scope="module")
def deployment() -> dict[str, Any]:
    docs = _documents(WORKER)
    assert set(docs) == {"Deployment"}, f"{WORKER.name} holds the worker's Deployment alone"
    return docs["Deployment"]


@pytest.fixture(scope="module")
def autoscaling() -> dict[str, dict[str, Any]]:
    docs = _documents(AUTOSCALING)
    assert set(docs) == {"ScaledObject", "TriggerAuthentication"}
    for doc in docs.values():
        assert doc["apiVersion"] == "keda.sh/v1alpha1"
    return docs


@pytest.fixture(scope="module")
def compose_worker() -> dict[str, Any]:
    service: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())["services"]["worker"]
    return service


@pytest.fixture(scope="module")
def container(deployment: dict[str, Any]) -> dict[str, Any]:
    (worker,) = deployment["spec"]["template"]["spec"]["containers"]
    return worker  # type: ignore[no-any-return]


def _literal_env(container: dict[str, Any]) -> dict[str, str]:
    """The container's environment variables given as values (not from a Secret)."""
    return {item["name"]: item["value"] for item in container["env"] if "value" in item}


def _secret_env(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """The container's environment variables read from a Secret: name -> secretKeyRef."""
    return {
        item["name"]: item["valueFrom"]["secretKeyRef"]
        for item in container["env"]
        if "secretKeyRef" in item.get("valueFrom", {})
    }


def _seconds(duration: str) -> float:
    """A compose duration (``30s``, ``1m30s``, ``500ms``) in seconds."""
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", duration)
    assert "".join(n + u for n, u in parts) == duration, f"not a duration: {duration!r}"
    assert parts, f"not a duration: {duration!r}"
    unit = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    return sum(float(n) * unit[u] for n, u in parts)


def _waiting_list(queue: str) -> str:
    """The Redis list a queue's messages wait in, from the project's own code: the key the worker's
    transport blocks on (``_Waiters.arm``: ``_q_for_pri(queue, 0)``), checked against the key the
    producers push to (``push_commands``). Priority 0 is our clients' (``producer.protocol``)."""
    channel = Channel.__new__(Channel)  # its key layout is class attributes: no connection needed
    key: str = channel._q_for_pri(queue, 0)
    ((_, pushed, *_),) = push_commands([(queue, [b"message"])])
    assert pushed == key, f"producers push {queue!r} to {pushed!r}, workers wait on {key!r}"
    return key


@pytest.fixture
def worker_settings(container: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The settings a worker of the Deployment reads: its literal environment, nothing else."""
    for name in list(os.environ):
        if name.upper().startswith("ITRAIN_"):
            monkeypatch.delenv(name)
    for name, value in _literal_env(container).items():
        monkeypatch.setenv(name, value)
    return Settings()


# -- the ScaledObject -----------------------------------------------------------------------------


def test_the_scaled_object_scales_the_worker_deployment(
    deployment: dict[str, Any], autoscaling: dict[str, dict[str, Any]]
) -> None:
    target = autoscaling["ScaledObject"]["spec"]["scaleTargetRef"]
    assert target["name"] == deployment["metadata"]["name"]
    assert target.get("kind", "Deployment") == "Deployment"
    assert target.get("apiVersion", "apps/v1") == deployment["apiVersion"]
    # KEDA owns the count: a `replicas` in the Deployment would reset it at each apply.
    assert "replicas" not in deployment["spec"]


def test_one_trigger_per_queue_on_the_list_its_messages_wait_in(
    autoscaling: dict[str, dict[str, Any]], worker_settings: Settings
) -> None:
    triggers = autoscaling["ScaledObject"]["spec"]["triggers"]
    assert [t["type"] for t in triggers] == ["redis"] * len(triggers)
    lists = [t["metadata"]["listName"] for t in triggers]
    expected = [_waiting_list(queue) for queue in worker_settings.queue_names]
    assert lists == expected, "one trigger per queue of ITRAIN_QUEUES, in its order"
    assert len(expected) > 1, "the example consumes several queues, as a worker of many tenants does"


def test_every_trigger_has_a_list_length_and_the_redis_password(
    autoscaling: dict[str, dict[str, Any]],
) -> None:
    auth = autoscaling["TriggerAuthentication"]["metadata"]["name"]
    for trigger in autoscaling["ScaledObject"]["spec"]["triggers"]:
        meta = trigger["metadata"]
        assert isinstance(meta["listLength"], str), "KEDA's metadata values are strings"
        assert int(meta["listLength"]) > 0
        assert re.fullmatch(r"[^:/]+:\d+", meta["address"]), "KEDA's address is host:port"
        assert int(meta["databaseIndex"]) >= 0
        assert trigger["authenticationRef"]["name"] == auth
        assert not {"password", "passwordFromEnv"} & set(meta), "the password comes from the Secret"


def test_the_trigger_authentication_reads_the_workers_secret(
    autoscaling: dict[str, dict[str, Any]], container: dict[str, Any]
) -> None:
    url_secret = _secret_env(container)["ITRAIN_REDIS_URL"]
    refs = autoscaling["TriggerAuthentication"]["spec"]["secretTargetRef"]
    assert [r["parameter"] for r in refs] == ["password"]
    assert refs[0]["name"] == url_secret["name"], "the password and the worker's URL: one Secret"


def test_a_worker_always_runs(autoscaling: dict[str, dict[str, Any]]) -> None:
    """Messages a worker has taken wait in ``unacked``, not in their list: KEDA cannot see them, and
    only a running worker sweeps a dead one's back after ITRAIN_VISIBILITY_TIMEOUT."""
    spec = autoscaling["ScaledObject"]["spec"]
    assert spec["minReplicaCount"] >= 1
    assert spec["maxReplicaCount"] >= spec["minReplicaCount"]


# -- the Deployment against the compose file and the settings -------------------------------------


def test_the_worker_runs_the_compose_worker_command(
    container: dict[str, Any], compose_worker: dict[str, Any]
) -> None:
    assert container["command"] == compose_worker["command"]
    assert container["command"][:4] == ["celery", "-A", "worker", "worker"], "the project's entry point"
    assert "args" not in container


def test_the_liveness_probe_is_the_compose_healthcheck(
    container: dict[str, Any], compose_worker: dict[str, Any]
) -> None:
    health = compose_worker["healthcheck"]
    kind, shell_command = health["test"]
    assert kind == "CMD-SHELL"
    probe = container["livenessProbe"]
    # CMD-SHELL runs `/bin/sh -c`; `$$` is compose's escape for a `$` the shell expands.
    assert probe["exec"]["command"] == ["/bin/sh", "-c", shell_command.replace("$$", "$")]
    assert probe["periodSeconds"] == _seconds(health["interval"])
    assert probe["timeoutSeconds"] == _seconds(health["timeout"])
    assert probe["initialDelaySeconds"] == _seconds(health["start_period"])
    assert probe["failureThreshold"] == health["retries"]
    # The ping must be able to give up (its --timeout) before the kubelet kills it.
    words = shlex.split(shell_command)
    assert probe["timeoutSeconds"] > float(words[words.index("--timeout") + 1])


def test_the_grace_period_covers_the_warm_shutdown(
    deployment: dict[str, Any], compose_worker: dict[str, Any]
) -> None:
    grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace >= _seconds(compose_worker["stop_grace_period"])


def test_the_environment_is_the_compose_workers(
    container: dict[str, Any], compose_worker: dict[str, Any]
) -> None:
    """Every variable compose gives the worker is set, with the same value where it is no secret."""
    compose_env = {str(k): str(v) for k, v in compose_worker["environment"].items()}
    literal, secret = _literal_env(container), _secret_env(container)
    assert set(compose_env) <= set(literal) | set(secret)
    assert "ITRAIN_REDIS_URL" in secret, "the URL carries the password: a Secret"
    for name in compose_env.keys() & literal.keys():
        assert literal[name] == compose_env[name], name


def test_every_itrain_name_is_a_setting(container: dict[str, Any]) -> None:
    """In the environment, and anywhere in the files' text (comments too): a renamed setting fails."""
    assert {item["name"] for item in container["env"]} <= SETTING_NAMES
    for path in (WORKER, AUTOSCALING):
        named = set(re.findall(r"\bITRAIN_[A-Z0-9_]*[A-Z0-9]", path.read_text()))
        assert named - SETTING_NAMES == set(), f"{path.name} names settings that do not exist"


def test_the_deployment_settings_are_valid(worker_settings: Settings) -> None:
    assert worker_settings.queue_names[0] == worker_settings.queue, "the shared queue is consumed"
