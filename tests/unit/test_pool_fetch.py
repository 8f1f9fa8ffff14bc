"""``worker.consume.pool_fetch.pool_fetch_queue``: which workers fetch in their pool processes."""

from __future__ import annotations

import logging

import pytest

from producer.settings import Settings
from worker.consume.pool_fetch import pool_fetch_queue

ON = Settings(pool_fetch=True)


def test_off_by_default() -> None:
    assert pool_fetch_queue(["itrain"], "prefork", Settings()) is None


@pytest.mark.parametrize("pool", ["prefork", "worker.consume.prefork:TaskPool"])
def test_a_prefork_worker_on_one_queue_fetches_in_its_pool(pool: str) -> None:
    assert pool_fetch_queue(["itrain"], pool, ON) == "itrain"


@pytest.mark.parametrize("pool", ["solo", "threads"])
def test_other_pools_keep_the_default_path_and_say_so(pool: str, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="itrain.pool_fetch"):
        assert pool_fetch_queue(["itrain"], pool, ON) is None
    assert "needs the prefork pool" in caplog.text


def test_a_worker_on_several_queues_keeps_the_default_path_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="itrain.pool_fetch"):
        assert pool_fetch_queue(["a", "b"], "prefork", ON) is None
    assert "consumes 2 (a, b)" in caplog.text
