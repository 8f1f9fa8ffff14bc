"""Master discovery while the sentinel that leads a failover still names the old master
(``producer.sentinel_discovery``): the leader's ``SENTINEL MASTERS`` keeps the old address until
every replica is reconfigured, here held up by a replica stopped (SIGSTOP) before the failover."""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest
import redis.sentinel

from producer.sentinel import master_client
from producer.sentinel_discovery import FailoverAwareSentinel, failing_over
from tests.helpers import wait_until
from worker.devtools.sentinel_set import SentinelSet

pytestmark = pytest.mark.timeout(180)


def _state(group: SentinelSet, i: int) -> dict[str, Any]:
    with group.sentinel_client(i) as client:
        state: dict[str, Any] = client.sentinel_master(group.name)
    return state


def _replica_silent_for(group: SentinelSet, port: int, ms: int) -> bool:
    with group.sentinel_client(0) as client:
        replicas = client.sentinel_slaves(group.name)
    return any(int(r["port"]) == port and int(r["last-ok-ping-reply"]) > ms for r in replicas)


def test_a_client_finds_the_promoted_master_while_the_failover_leader_names_the_old(tmp_path: Path) -> None:
    # (slow to judge a server down, slow to give a failover up: the stopped replica holds the
    # leader in its failover for the whole test)
    with SentinelSet(data_dir=tmp_path / "s", down_after_ms=60_000, failover_timeout_ms=60_000) as group:
        # Given a replica that stopped answering long enough not to be promoted (5 s of pings)
        old = group.master_port()
        held = next(s for s in group.servers if s.port != old)
        assert held.proc is not None
        held.proc.send_signal(signal.SIGSTOP)
        try:
            wait_until(lambda: _replica_silent_for(group, held.port, 5500), 30, "the replica to go quiet")
            # When the first sentinel of the URL leads a failover and the others follow it
            with group.sentinel_client(0) as leader:
                leader.execute_command("SENTINEL", "FAILOVER", group.name)

            def peers_moved() -> bool:
                return all(int(_state(group, i)["port"]) != old for i in (1, 2))

            wait_until(peers_moved, 30, "the other sentinels to name the promoted replica")
            new = int(_state(group, 1)["port"])
            leading = _state(group, 0)
            # (the window this is about: the leader is failing over and names the old master)
            assert failing_over(leading), leading["flags"]
            assert int(leading["port"]) == old
            addresses = [("127.0.0.1", port) for port in group.sentinel_ports]
            # Then redis-py's own discovery, asking the leader first, names the old master...
            assert redis.sentinel.Sentinel(addresses).discover_master(group.name)[1] == old
            # ...while ours names the promoted one, and a client's write lands there
            assert FailoverAwareSentinel(addresses).discover_master(group.name) == ("127.0.0.1", new)
            client = master_client(group.url(master_name=True), 5.0)
            client.set("written-after-the-promotion", "1")
            client.close()
            assert group.server_client(new).get("written-after-the-promotion") == b"1"
            assert group.server_client(old).get("written-after-the-promotion") is None
            # And with the leader alone to ask, its answer is still taken (a master is found)
            assert FailoverAwareSentinel(addresses[:1]).discover_master(group.name)[1] == old
            # And still the leader: the whole check ran inside its failover
            assert failing_over(_state(group, 0))
        finally:
            held.proc.send_signal(signal.SIGCONT)
