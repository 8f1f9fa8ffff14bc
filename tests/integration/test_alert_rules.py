"""The alert rules of ``deploy/prometheus/itrain-alerts.yml``, checked and run by Prometheus's own
``promtool`` on series shaped like the exporter's (skipped where promtool is not installed)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "itrain-alerts.yml"
PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
COMPOSE = ROOT / "docker-compose.yml"

promtool = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    promtool is None, reason="promtool is not installed (Debian: apt-get install prometheus)"
)

# A queue whose head waits longer and longer (its age grows 60 s a minute) beside one drained
# every minute; a model whose guard trips at minute 10 and stays paused, beside a healthy one.
TESTS = """
rule_files:
  - {rules}
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'itrain_queue_oldest_age_seconds{{queue="itrain"}}'
        values: '0+60x20'
      - series: 'itrain_queue_oldest_age_seconds{{queue="itrain.b"}}'
        values: '0x20'
      - series: 'itrain_guard_paused{{model="bad"}}'
        values: '0x9 1x10'
      - series: 'itrain_guard_trips_total{{model="bad"}}'
        values: '0x9 1x10'
      - series: 'itrain_guard_paused{{model="good"}}'
        values: '0x20'
      - series: 'itrain_guard_trips_total{{model="good"}}'
        values: '0x20'
    alert_rule_test:
      - eval_time: 5m
        alertname: ItrainQueueStuck
        exp_alerts: []
      - eval_time: 8m
        alertname: ItrainQueueStuck
        exp_alerts:
          - exp_labels: {{severity: page, queue: itrain}}
            exp_annotations:
              summary: "itrain queue itrain: the next message has waited 8m 0s"
              description: >-
                Check that workers run and consume queue itrain (`itrain models`,
                `celery -A worker inspect active_queues`) and that they train (their logs,
                itrain_lock_hold_seconds).
      - eval_time: 9m
        alertname: ItrainGuardPausedOrTripping
        exp_alerts: []
      - eval_time: 12m
        alertname: ItrainGuardPausedOrTripping
        exp_alerts:
          - exp_labels: {{severity: page, model: bad}}
            exp_annotations:
              summary: "itrain model bad: guard paused or tripping"
              description: >-
                The model's online loss rose past its guard (`itrain stats --model bad`
                shows the guard and the evaluation); its weights were rolled back to the best recent
                snapshot. Fix the event stream, then `itrain resume --model bad` and
                send the refused events again (`itrain dead-letters --model bad`).
"""


@needs_promtool
def test_the_rules_file_is_valid() -> None:
    done = subprocess.run([promtool, "check", "rules", str(RULES)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


@needs_promtool
def test_a_stuck_queue_and_a_tripped_guard_fire_and_healthy_ones_do_not(tmp_path: Path) -> None:
    # Given the rules and series of a stuck queue, a drained one, a tripped and a healthy model
    (tmp_path / "itrain-alerts.yml").write_text(RULES.read_text())
    tests = tmp_path / "tests.yml"
    tests.write_text(TESTS.format(rules="itrain-alerts.yml"))
    # When promtool runs them through Prometheus's rule engine
    done = subprocess.run(
        [promtool, "test", "rules", tests.name], capture_output=True, text=True, cwd=tmp_path
    )
    # Then only the stuck queue (once it waited 5 minutes, for 2) and the tripped model alert
    assert done.returncode == 0, done.stdout + done.stderr


def test_prometheus_loads_the_rules_and_compose_mounts_them_beside_its_config() -> None:
    config = yaml.safe_load(PROMETHEUS.read_text())
    assert config["rule_files"] == [RULES.name]
    mounts = [str(v) for v in yaml.safe_load(COMPOSE.read_text())["services"]["prometheus"]["volumes"]]
    assert f"./{RULES.relative_to(ROOT)}:/etc/prometheus/{RULES.name}:ro" in mounts
