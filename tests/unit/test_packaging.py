"""Packaging: ``producer`` runs without the ``[worker]`` extra, and ``itrain`` without it says what
to install. Each check runs in a subprocess whose imports of numpy, numba, rich and flower fail,
as on a machine that ran only ``pip install interaction-trainer``."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import tomllib
import uuid
from pathlib import Path

import redis

from worker.devtools.embedded_redis import RedisServer
from worker.entry import WORKER_EXTRA

ROOT = Path(__file__).resolve().parents[2]
ITRAIN = str(Path(sys.executable).with_name("itrain"))

# Installed as sitecustomize: runs before anything else in the subprocess.
BLOCKER = textwrap.dedent(
    """
    import sys

    BLOCKED = {blocked!r}
    ATTEMPTS = []

    class BlockWorkerExtra:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                ATTEMPTS.append(name)
                raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)", name=name)
            return None

    sys.meta_path.insert(0, BlockWorkerExtra())
    """
)


def run_without_extra(
    tmp_path: Path, argv: list[str], env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    (tmp_path / "sitecustomize.py").write_text(BLOCKER.format(blocked=sorted({*WORKER_EXTRA, "llvmlite"})))
    return subprocess.run(
        argv,
        env={**os.environ, **env, "PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_the_blocker_blocks(tmp_path: Path) -> None:
    """The subprocess really cannot import numpy (else the tests below prove nothing)."""
    done = run_without_extra(tmp_path, [sys.executable, "-c", "import numpy"], {})
    assert done.returncode != 0
    assert "blocked by the test" in done.stderr


def test_producer_publishes_without_the_worker_extra(
    tmp_path: Path, redis_server: RedisServer, redis_client: redis.Redis
) -> None:
    """``import producer``, a ``TrainingClient``, an event published: none of it needs numpy,
    numba, rich or flower, and none of them is even attempted."""
    # Given a queue of this test's own
    queue = f"packaging-{uuid.uuid4().hex[:8]}"
    script = textwrap.dedent(
        """
        import producer
        from producer import TrainingClient

        client = TrainingClient()
        handle = client.train_step(
            {"event_id": "pkg-1", "user_id": "u1", "action_type": "click",
             "timestamp": 1700000000, "model": "pkg"}
        )
        print(handle.id)
        assert not ATTEMPTS, f"tried to import {ATTEMPTS}"
        """
    )
    # When a process that cannot import the worker extra publishes one event
    done = run_without_extra(
        tmp_path,
        [sys.executable, "-c", "from sitecustomize import ATTEMPTS\n" + script],
        {"ITRAIN_REDIS_URL": redis_server.url, "ITRAIN_QUEUE": queue},
    )
    try:
        # Then it succeeds, and the message is on the queue
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip()
        assert redis_client.llen(queue) == 1
    finally:
        redis_client.delete(queue)


def test_itrain_without_the_worker_extra_names_the_install_command(tmp_path: Path) -> None:
    """The installed ``itrain`` script exits 1 with one line on stderr naming the extra, no traceback."""
    done = run_without_extra(tmp_path, [ITRAIN, "stats", "--model", "m"], {})
    assert done.returncode == 1
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "pip install 'interaction-trainer[worker]'" in lines[0]
    assert "Traceback" not in done.stderr
    assert done.stdout == ""


def test_pyproject_splits_producer_and_worker_dependencies() -> None:
    """The base install names none of the worker's modules; the ``[worker]`` extra names all."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]

    def names(reqs: list[str]) -> set[str]:
        return {r.split("[")[0].split(">")[0].split("<")[0].split("=")[0].strip().lower() for r in reqs}

    assert not names(project["dependencies"]) & set(WORKER_EXTRA)
    assert set(WORKER_EXTRA) <= names(project["optional-dependencies"]["worker"])
    assert project["scripts"]["itrain"] == "worker.entry:main"
