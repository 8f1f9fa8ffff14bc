"""``itrain plot``: the loss plot drawn from a model's real training history."""

from __future__ import annotations

import sys

import pytest

from tests.helpers import raw_event
from tests.integration.test_cli import cli, one_line
from tests.integration.test_run_messages import own_runtime, step_message
from worker.consume.runtime import run_messages
from worker.ops.plot import INSTALL_HINT, moving_average, read_loss_series

__all__ = ["cli", "own_runtime"]  # fixtures, imported for the tests below

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_moving_average_is_the_mean_of_the_last_window() -> None:
    assert moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert moving_average([2.0], 50) == [2.0]


def test_plot_draws_the_history_of_trained_events(
    own_runtime, make_model, redis_client, cli, capsys, tmp_path
) -> None:
    # Given a model that trained 120 events
    model = make_model()
    run_messages([step_message(f"p{i}", raw_event(model, f"p{i}")) for i in range(120)])
    series = read_loss_series(redis_client, model)
    assert series.steps == list(range(1, 121))
    # When its loss is plotted
    out = tmp_path / "loss.png"
    assert cli(["plot", "--model", model, "--out", str(out)]) == 0
    # Then a PNG of the set size is written, and the command says what it drew
    assert out.read_bytes()[:8] == PNG_SIGNATURE
    import matplotlib.image

    height, width, _ = matplotlib.image.imread(out).shape
    assert (width, height) == (990, 495)
    assert "120 events, steps 1-120" in capsys.readouterr().out


def test_plot_of_a_missing_model_exits_1(cli, capsys, model_name, tmp_path) -> None:
    assert cli(["plot", "--model", model_name, "--out", str(tmp_path / "x.png")]) == 1
    assert "does not exist" in one_line(capsys.readouterr().err)
    assert not (tmp_path / "x.png").exists()


def test_plot_without_matplotlib_says_how_to_install_it(
    own_runtime, make_model, cli, capsys, tmp_path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Given a trained model, and matplotlib not installed (its import fails)
    model = make_model()
    run_messages([step_message("m1", raw_event(model, "m1"))])
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    # When a plot is asked for, then one line says which extra to install
    assert cli(["plot", "--model", model, "--out", str(tmp_path / "x.png")]) == 1
    assert one_line(capsys.readouterr().err) == f"itrain: {INSTALL_HINT}"
