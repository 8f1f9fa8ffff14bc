"""``itrain`` written to a pipe: whole lines, Markdown tables, whatever the terminal's width.

Each command runs as a subprocess with ``COLUMNS`` unset, stdin from /dev/null and stdout a pipe,
as in CI or a script. Rich alone would fit its output to 80 columns there, folding long lines and
cutting table cells; these tests print values far longer than that and find each one whole on
one line.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

from tests.helpers import raw_event
from tests.integration.test_run_messages import own_runtime, step_message
from worker.consume.runtime import run_messages

__all__ = ["own_runtime"]  # a fixture, imported for the tests below

ITRAIN = str(Path(sys.executable).with_name("itrain"))


def long_name() -> str:
    """A model name as long as events accept (64 characters): every table row is wider than 80."""
    name = f"out-{uuid.uuid4().hex}-"
    return name + "n" * (64 - len(name))


def itrain(*args: str, redis_url: str | None = None, timeout: float = 120) -> str:
    """Runs ``itrain`` as CI would; returns its stdout (fails on a non-zero exit)."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES", "FORCE_COLOR")}
    if redis_url is not None:
        env["ITRAIN_REDIS_URL"] = redis_url
    done = subprocess.run(
        [ITRAIN, *args],
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def table_rows(text: str) -> list[list[str]]:
    """The cells of every Markdown table row in ``text`` (separator rows left out)."""
    rows = []
    for line in text.splitlines():
        if line.startswith("| ") and line.endswith(" |"):
            cells = [c.strip() for c in line[2:-2].split(" | ")]
            if not all(set(c) <= set("-:") for c in cells):
                rows.append(cells)
    return rows


def test_stats_models_and_plot_print_whole_lines_to_a_pipe(
    own_runtime, make_model, redis_url, tmp_path
) -> None:
    # Given a model with the longest name there is, that trained 30 events
    model = make_model(long_name())
    run_messages([step_message(f"o{i}", raw_event(model, f"o{i}")) for i in range(30)])

    # When `itrain stats` prints to a pipe
    stats = {row[0]: row[1:] for row in table_rows(itrain("stats", "--model", model, redis_url=redis_url))}
    # Then each statistic is one row, its value whole (the evaluation line alone is ~100 wide)
    assert stats["model"] == [model]
    assert stats["step"] == ["30"]
    (evaluation,) = stats["eval"]
    assert evaluation.startswith("window ")
    assert "all 30 logloss" in evaluation
    assert " acc " in evaluation

    # When `itrain models` prints to a pipe: the model's row holds every column, its name whole
    header, *rows = table_rows(itrain("models", redis_url=redis_url))
    assert header[:4] == ["model", "queue", "version", "step"]
    row = next(r for r in rows if r[0] == model)
    assert len(row) == len(header) == 9
    assert row[3] == "30"

    # When `itrain plot` writes to a path far longer than 80 characters
    out = tmp_path / ("p" * 90) / "loss.png"
    out.parent.mkdir()
    lines = itrain("plot", "--model", model, "--out", str(out), redis_url=redis_url).splitlines()
    # Then it says so on one line
    assert lines == [f"wrote {out} (30 events, steps 1-30)"]


def test_bench_only_prints_the_table_of_what_ran_whole(tmp_path) -> None:
    # When one cheap scenario of the benchmark runs with its output to a pipe (it starts its own
    # Redis and workers)
    text = itrain("bench", "--quick", "--only", "b1", "--logs", str(tmp_path), timeout=600)
    # Then its one table has a header and a row, each whole, and the title is one line
    header, *rows = table_rows(text)
    assert header[0] == "scenario"
    assert header[-1] == "CPU µs/event prod/redis/main/pool"
    (row,) = rows
    assert row[0] == "b1"
    assert len(row) == len(header) == 10
    assert all(cell for cell in row)
    assert any(line.startswith("itrain bench: ") and "cores, Python" in line for line in text.splitlines())
    # And the message-path and memory tables, which `--only` does not run, are not printed
    assert "message path" not in text
    assert "Redis memory" not in text


def test_bench_only_with_an_unknown_scenario_says_so_before_starting_anything() -> None:
    done = subprocess.run(
        [ITRAIN, "bench", "--only", "c2,nope"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.startswith("itrain: --only: no scenario nope (known: ")
    assert len(done.stderr.splitlines()) == 1
