"""``itrain exporter``: Prometheus metrics read from a real Redis, moving as events train."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry

from producer.keys import ModelKeys
from producer.settings import get_settings
from producer.stats import read_stats
from tests.helpers import raw_event, wait_http
from tests.integration.test_cli import one_line
from tests.integration.test_run_messages import own_runtime, step_message
from worker.cli import main
from worker.consume.runtime import run_messages
from worker.devtools.embedded_redis import free_port
from worker.ops.exporter import ItrainCollector

__all__ = ["own_runtime"]  # the fixture, imported for the tests below


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """{(sample name, sorted labels): value} of a Prometheus text page."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(collector: ItrainCollector) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return samples(generate_latest(registry).decode())


def test_values_move_as_events_train(own_runtime, make_model, redis_client) -> None:
    # Given a model, and an exporter's collector on the same Redis
    model = make_model()
    collector = ItrainCollector(redis_client, ["itrain-exporter-test"])
    redis_client.rpush("itrain-exporter-test", b"x", b"y")
    m = (("model", model),)
    before = scrape(collector)
    assert before[("itrain_up", ())] == 1
    assert before[("itrain_model_step", m)] == 0
    assert before[("itrain_queue_messages", (("queue", "itrain-exporter-test"),))] == 2
    # When 30 events train (20 clicks, 10 views) and one fails (an action with no target)
    good = [raw_event(model, f"x{i}", action_type="click" if i < 20 else "view") for i in range(30)]
    bad = raw_event(model, "bad", action_type="no-such-action")
    run_messages([step_message(f"t{i}", e) for i, e in enumerate([*good, bad])])
    after = scrape(collector)
    # Then the scrape shows them: step, version, counts by action, failures and dead letters
    assert after[("itrain_model_step", m)] == 30
    assert after[("itrain_model_version", m)] > before[("itrain_model_version", m)]
    assert after[("itrain_interactions_total", (("action", "click"), *m))] == 20
    assert after[("itrain_interactions_total", (("action", "view"), *m))] == 10
    assert after[("itrain_failures_total", m)] == 1
    assert after[("itrain_dead_letters", m)] == 1
    assert after[("itrain_model_loss_ema", m)] > 0
    assert after[("itrain_redis_memory_used_bytes", ())] > 0
    # And the online evaluation, as ``itrain stats`` shows it; no guard, so never paused
    ev = read_stats(redis_client, model)["eval"]
    assert ("itrain_eval_logloss", m) not in before
    for scope, figures in (("window", ev), ("total", ev["total"])):
        labels = (*m, ("scope", scope))
        assert after[("itrain_eval_events", labels)] == figures["count"] == 30
        assert after[("itrain_eval_logloss", labels)] == pytest.approx(figures["logloss"])
        assert after[("itrain_eval_mse", labels)] == pytest.approx(figures["mse"])
        assert after[("itrain_eval_accuracy", labels)] == pytest.approx(figures["accuracy"])
    assert ("itrain_eval_auc", m) not in after  # every click's target is 1: one class, no AUC
    assert after[("itrain_guard_paused", m)] == 0
    assert after[("itrain_guard_trips_total", m)] == 0
    # (the one critical section those events trained in is in the lock histograms)
    assert after[("itrain_lock_wait_seconds_count", m)] == 1
    assert after[("itrain_lock_hold_seconds_sum", m)] > 0
    # And the lock histograms count buckets cumulatively up to +Inf
    redis_client.delete(ModelKeys(model).lock_stats)
    fields = {"w:0": 2, "w:3": 1, "w:sum": "0.0061", "h:13": 1, "h:sum": "7.5"}
    redis_client.hset(ModelKeys(model).lock_stats, mapping=fields)
    hist = scrape(collector)
    assert hist[("itrain_lock_wait_seconds_bucket", (("le", "0.0005"), *m))] == 2
    assert hist[("itrain_lock_wait_seconds_bucket", (("le", "0.005"), *m))] == 3
    assert hist[("itrain_lock_wait_seconds_count", m)] == 3
    assert hist[("itrain_lock_wait_seconds_sum", m)] == pytest.approx(0.0061)
    assert hist[("itrain_lock_hold_seconds_bucket", (("le", "5.0"), *m))] == 0
    assert hist[("itrain_lock_hold_seconds_bucket", (("le", "+Inf"), *m))] == 1


def test_a_scrape_costs_two_round_trips_whatever_the_models(make_model, redis_client) -> None:
    collector = ItrainCollector(redis_client, ["itrain"])
    make_model()
    scrape(collector)
    assert collector.round_trips == 2
    for _ in range(20):
        make_model()
    scrape(collector)
    assert collector.round_trips == 2


def test_exporter_command_serves_metrics_on_127_0_0_1(redis_url, make_model) -> None:
    # Given `itrain exporter` started on a free port
    model = make_model()
    port = free_port()
    env = {**os.environ, "ITRAIN_REDIS_URL": redis_url}
    proc = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "exporter", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        status, body = wait_http(f"http://127.0.0.1:{port}/metrics", proc)
        # Then /metrics answers with the model's figures, and Redis is reported up
        assert status == 200
        page = samples(body.decode())
        assert page[("itrain_up", ())] == 1
        assert page[("itrain_model_step", (("model", model),))] == 0
    finally:
        proc.terminate()
        proc.wait(10)


def test_exporter_with_redis_unreachable_exits_1(capsys, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ITRAIN_REDIS_URL", f"redis://127.0.0.1:{free_port()}/0")
    get_settings.cache_clear()
    try:
        assert main(["exporter", "--port", str(free_port())]) == 1
    finally:
        monkeypatch.undo()
        get_settings.cache_clear()
    assert "cannot reach" in one_line(capsys.readouterr().err)
