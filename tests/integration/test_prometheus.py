"""The operator's view against a real Prometheus: ``itrain exporter`` scraped with the project's
``deploy/prometheus/prometheus.yml``, every expression of the Grafana dashboard evaluated through
Prometheus's HTTP API, its values compared with ``itrain stats``.

The dashboard is read, not listed here: a panel added to ``deploy/grafana/dashboards/itrain.json``
is covered without a change to this file. Skipped where there is no ``prometheus`` binary (Debian:
``apt-get install prometheus``; ``.ci/run`` installs it).
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import socket
import subprocess
import sys
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from producer.client import TrainingClient
from tests.helpers import http_get, make_certificates, raw_event, wait_http, wait_until
from worker.devtools.embedded_redis import RedisServer, free_port

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "itrain.json"
PROMETHEUS_YML = ROOT / "deploy" / "prometheus" / "prometheus.yml"

pytestmark = pytest.mark.skipif(
    shutil.which("prometheus") is None,
    reason="no `prometheus` binary on PATH (Debian: apt-get install prometheus; .ci/run installs it)",
)


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    """A Redis of this file's own (the tests' workers, client, exporter and stats all use it). The
    exporter reports every model of its Redis, and the session's holds hundreds from earlier test
    files by now: their scrape (0.55 s for 600 models on an idle machine) outlasts the 1 s scrape
    interval on a busy one, and Prometheus then marks every series stale (CI: a panel's query
    returned no series)."""
    server = RedisServer().start()
    yield server.url
    server.close()


#: Grafana's own variables, as a dashboard of a 1 s scrape would see them.
GRAFANA_BUILTINS = {
    "__rate_interval": "1m",
    "__interval": "5s",
    "__interval_ms": "5000",
    "__range": "5m",
    "__range_s": "300",
    "__range_ms": "300000",
}

#: Dashboard expressions that are one of ``itrain stats``'s figures, and where stats keeps it.
STATS_OF_GAUGE = {
    "itrain_model_step": lambda s: s["step"],
    "itrain_model_version": lambda s: s["version"],
    "itrain_model_loss_last": lambda s: s["loss_last"],
    "itrain_model_loss_ema": lambda s: s["loss_ema"],
    "itrain_dead_letters": lambda s: s["dead_letters"],
    "itrain_eval_auc": lambda s: s["eval"]["auc"],
    "itrain_guard_paused": lambda s: int(s["eval"]["guard"]["paused"]),
}


# -- the dashboard --------------------------------------------------------------------------------


def dashboard_expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, expression) of every Prometheus target, rows' nested panels included."""
    found: list[tuple[str, str]] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            for target in panel.get("targets", []):
                if target.get("expr"):
                    found.append((panel.get("title", "?"), target["expr"]))
            walk(panel.get("panels", []))

    walk(dashboard.get("panels", []))
    return found


_VARIABLE = re.compile(r"\$\{(\w+)(?::\w+)?\}|\[\[(\w+)\]\]|\$(\w+)")


def substitute(expr: str, values: dict[str, str]) -> str:
    """``expr`` with every Grafana variable (``$x``, ``${x}``, ``${x:fmt}``, ``[[x]]``) replaced
    from ``values``; KeyError naming a variable that has no value."""

    def one(match: re.Match[str]) -> str:
        name = next(g for g in match.groups() if g)
        if name not in values:
            raise KeyError(f"dashboard variable ${name} has no value in this test")
        return values[name]

    return _VARIABLE.sub(one, expr)


def promql_regex_escape(value: str) -> str:
    """``value`` as a literal inside a PromQL regex string, escaped as Grafana escapes a
    variable's values (a backslash for the regex, doubled for the string)."""
    return re.sub(r"([\\^$.|?*+(){}\[\]])", r"\\\\\1", value)


def test_substitute_names_every_form_and_refuses_unknown_ones() -> None:
    values = {"model": "(a|b)", "__rate_interval": "1m"}
    assert (
        substitute('rate(x{model=~"$model"}[$__rate_interval]) + y{m=~"${model}", n=~"[[model]]"}', values)
        == 'rate(x{model=~"(a|b)"}[1m]) + y{m=~"(a|b)", n=~"(a|b)"}'
    )
    with pytest.raises(KeyError, match=r"\$queue"):
        substitute('x{queue=~"$queue"}', values)
    # (a value is a literal in the regex: its dots escaped for the regex, then for the string)
    assert promql_regex_escape("m-1.a") == "m-1\\\\.a"


# -- Prometheus -----------------------------------------------------------------------------------


@dataclass
class Prometheus:
    url: str
    proc: subprocess.Popen[bytes]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector of ``expr`` now (its ``result`` list); AssertionError with
        Prometheus's own error when it refuses the expression."""
        status, body = http_get(f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        reply = json.loads(body)
        assert status == 200, f"{expr}: {reply.get('error', body)}"
        assert reply["status"] == "success", f"{expr}: {reply}"
        assert reply["data"]["resultType"] == "vector", expr
        return list(reply["data"]["result"])

    def label_values(self, label: str, metric: str) -> list[str]:
        match = urllib.parse.urlencode({"match[]": metric})
        status, body = http_get(f"{self.url}/api/v1/label/{label}/values?{match}")
        assert status == 200, body
        return list(json.loads(body)["data"])


def scrape_config(port: int, tmp: Path, secure: bool) -> Path:
    """A copy of the project's prometheus.yml pointed at the exporter on ``port``, scraping every
    second (with basic auth and TLS verified against the test's CA when ``secure``)."""
    config = yaml.safe_load(PROMETHEUS_YML.read_text())
    config["global"]["scrape_interval"] = "1s"
    config["global"]["evaluation_interval"] = "1s"
    (job,) = config["scrape_configs"]
    job["static_configs"] = [{"targets": [f"127.0.0.1:{port}"]}]
    if secure:
        job["scheme"] = "https"
        job["basic_auth"] = {"username": "prometheus", "password_file": str(tmp / "password")}
        job["tls_config"] = {"ca_file": str(tmp / "ca.crt")}
    path = tmp / "prometheus.yml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture
def start_prometheus(tmp_path: Path) -> Iterator[Any]:
    """``start(config_path)``: a Prometheus on a free port of 127.0.0.1 with its own storage in
    ``tmp_path``, ready; stopped by pid at teardown."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(config: Path) -> Prometheus:
        port = free_port()
        log = (tmp_path / "prometheus.log").open("wb")
        proc = subprocess.Popen(
            [
                "prometheus",
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        procs.append(proc)
        url = f"http://127.0.0.1:{port}"
        wait_http(f"{url}/-/ready", proc, timeout=60)
        wait_until(lambda: http_get(f"{url}/-/ready")[0] == 200, 60, "Prometheus ready")
        return Prometheus(url, proc)

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.fixture
def start_exporter(redis_url: str, tmp_path: Path) -> Iterator[Any]:
    """``start(extra_env)``: ``itrain exporter`` on a free port with these extra settings, once it
    listens; returns its port. Stopped by pid at teardown."""
    procs: list[subprocess.Popen[bytes]] = []

    def start(extra: dict[str, str]) -> int:
        port = free_port()
        proc = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "exporter", "--port", str(port)],
            env={**os.environ, "ITRAIN_REDIS_URL": redis_url, **extra},
            stdout=(tmp_path / "exporter.log").open("wb"),
            stderr=subprocess.STDOUT,
        )
        procs.append(proc)

        def listening() -> bool:
            assert proc.poll() is None, (tmp_path / "exporter.log").read_text()
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
            except OSError:
                return False
            return True

        wait_until(listening, 30, "the exporter listening")
        return port

    yield start
    for proc in procs:
        proc.terminate()
        proc.wait(10)


def itrain_stats(redis_url: str, model: str) -> dict[str, Any]:
    """``itrain stats --model M --json``, run as a user would."""
    done = subprocess.run(
        [sys.executable, "-m", "worker.cli", "stats", "--model", model, "--json"],
        env={**os.environ, "ITRAIN_REDIS_URL": redis_url},
        capture_output=True,
        check=True,
    )
    stats: dict[str, Any] = json.loads(done.stdout)
    return stats


def variable_value(prometheus: Prometheus, variable: dict[str, Any]) -> str:
    """A dashboard variable's value as Grafana sends it: a ``label_values()`` query set to All is a
    regex of every value Prometheus lists; any other variable, its current value."""
    if variable.get("type") != "query":
        current = variable.get("current", {}).get("value")
        assert isinstance(current, str), f"dashboard variable {variable['name']}: no current value"
        return current
    query = variable.get("query")  # (an object in current dashboards, a string in older ones)
    query = variable.get("definition") or (query.get("query", "") if isinstance(query, dict) else query)
    found = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", query)
    assert found, f"dashboard variable {variable['name']}: {query!r} is not a label_values() query"
    listed = prometheus.label_values(found[2], found[1])
    assert listed, f"dashboard variable {variable['name']} lists nothing"
    return "(" + "|".join(promql_regex_escape(v) for v in listed) + ")"


# -- the test -------------------------------------------------------------------------------------


@pytest.mark.parametrize("secure", [False, True], ids=["plain", "basic-auth-tls"])
def test_every_dashboard_expression_returns_data_that_matches_itrain_stats(
    secure: bool,
    redis_url: str,
    make_model,
    start_workers,
    start_prometheus,
    start_exporter,
    tmp_path: Path,
) -> None:
    # Given a model, a worker, `itrain exporter` and a Prometheus scraping it with the project's
    # prometheus.yml (once plain, once with basic auth over TLS as an operator would set it up)
    model = make_model()
    start_workers(1)
    extra: dict[str, str] = {}
    if secure:
        make_certificates(tmp_path)
        (tmp_path / "password").write_text("scrape-secret-Ω\n")
        extra = {
            "ITRAIN_EXPORTER_PASSWORD_FILE": str(tmp_path / "password"),
            "ITRAIN_EXPORTER_TLS_CERT": str(tmp_path / "server.crt"),
            "ITRAIN_EXPORTER_TLS_KEY": str(tmp_path / "server.key"),
        }
    port = start_exporter(extra)
    prometheus = start_prometheus(scrape_config(port, tmp_path, secure))
    assert wait_until(lambda: prometheus.query(f'itrain_model_step{{model="{model}"}} == 0'), 60, "a scrape")
    (up,) = prometheus.query('up{job="itrain"}')  # (Prometheus's own: the scrape itself succeeded)
    assert float(up["value"][1]) == 1

    # When events train, in two rounds each seen by a scrape (so that every counter the rates read
    # exists before it rises): clicks and dismisses (both classes, for the AUC), and one that fails
    events = [
        raw_event(model, f"e{i}", user_id=f"u{i % 7}", action_type="click" if i % 3 else "dismiss")
        for i in range(300)
    ]
    events.append(raw_event(model, "bad", action_type="no-such-action"))
    with TrainingClient(redis_url=redis_url) as client:
        for part, step in ((events[:60], 60), (events[60:], 300)):
            results = client.wait_all(client.train_many(part), timeout=120)
            good = sum(e["action_type"] != "no-such-action" for e in part)
            assert [r["status"] for r in results if isinstance(r, dict)] == ["trained"] * good
            query = f'itrain_model_step{{model="{model}"}} == {step}'
            wait_until(lambda q=query: prometheus.query(q), 60, f"a scrape at step {step}")
    stats = itrain_stats(redis_url, model)
    assert stats["step"] == 300
    assert stats["dead_letters"] == 1

    # Then every expression of the dashboard returns at least one series, each value a number
    dashboard = json.loads(DASHBOARD.read_text())
    values = dict(GRAFANA_BUILTINS)
    for variable in dashboard.get("templating", {}).get("list", []):
        values[variable["name"]] = variable_value(prometheus, variable)
    expressions = dashboard_expressions(dashboard)
    assert len(expressions) >= 21
    checked = 0
    for title, expr in expressions:
        series = prometheus.query(substitute(expr, values))
        assert series, f"panel {title!r}: {expr} returned no series"
        for s in series:
            value = float(s["value"][1])
            assert not math.isinf(value), f"panel {title!r}: {expr} = {value} for {s['metric']}"
        # And each of ``itrain stats``'s figures the dashboard shows has stats's value
        ours = [s for s in series if s["metric"].get("model") == model]
        name = re.fullmatch(r"(\w+)\{[^}]*\}", expr)
        if name and name[1] in STATS_OF_GAUGE:
            (mine,) = ours
            expected = STATS_OF_GAUGE[name[1]](stats)
            assert float(mine["value"][1]) == pytest.approx(expected), f"{expr} vs itrain stats"
            checked += 1
        elif "model" in expr and "histogram_quantile" not in expr:
            assert ours, f"panel {title!r}: {expr} has no series for model {model}"
    assert checked >= 5
    # And the counters behind the rates agree with stats too
    by_action = {
        s["metric"]["action"]: float(s["value"][1])
        for s in prometheus.query(f'itrain_interactions_total{{model="{model}"}}')
    }
    assert by_action == stats["interactions_by_action"] == {"click": 200, "dismiss": 100}
    (failures,) = prometheus.query(f'itrain_failures_total{{model="{model}"}}')
    assert float(failures["value"][1]) == stats["failures"] == 1
    (logloss,) = prometheus.query(f'itrain_eval_logloss{{model="{model}", scope="window"}}')
    assert float(logloss["value"][1]) == pytest.approx(stats["eval"]["logloss"])
    (rate,) = prometheus.query(f'sum by (model) (rate(itrain_interactions_total{{model="{model}"}}[1m]))')
    assert float(rate["value"][1]) > 0
