"""``itrain produce``: synthetic events sent (paced or not) through ``train_many`` to real workers,
every result awaited and counted."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from producer.client import TrainingClient


@pytest.mark.parametrize("rate", [None, "2000"], ids=["unpaced", "paced"])
def test_produce_trains_every_event_and_counts_the_results(
    start_workers, make_model, client: TrainingClient, redis_url: str, rate: str | None
) -> None:
    # Given a model and a worker
    model = make_model()
    start_workers(1)
    # When `itrain produce --wait` sends 300 events
    args = ["produce", "--model", model, "--events", "300", "--wait"] + (["--rate", rate] if rate else [])
    proc = subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        env={**os.environ, "ITRAIN_REDIS_URL": redis_url},
        capture_output=True,
        text=True,
        timeout=120,
    )
    # Then it exits 0, reports every event trained, and the model agrees
    assert proc.returncode == 0, proc.stderr
    assert "enqueued 300 events" in proc.stdout
    assert "trained 300" in proc.stdout, proc.stdout
    assert client.stats(model)["step"] == 300
