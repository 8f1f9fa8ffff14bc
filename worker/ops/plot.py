"""``itrain plot``: a model's per-event training loss and its moving average, as a PNG.

The points come from the model's training history (``itrain:{m}:history``, the last
``ITRAIN_HISTORY_MAX`` trained events, each with its step and the loss of the prediction made
before its update). matplotlib is an optional extra (``pip install 'interaction-trainer[plot]'``):
a worker never needs it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
import redis

from producer.errors import ConfigurationError, ModelNotInitialisedError
from producer.keys import ModelKeys

__all__ = ["INSTALL_HINT", "LossSeries", "moving_average", "plot_loss", "read_loss_series"]

INSTALL_HINT = "itrain plot needs matplotlib: pip install 'interaction-trainer[plot]'"


class LossSeries:
    """Steps and losses of the history, oldest first."""

    __slots__ = ("losses", "model", "steps")

    def __init__(self, model: str, steps: list[int], losses: list[float]) -> None:
        self.model = model
        self.steps = steps
        self.losses = losses


def read_loss_series(client: redis.Redis, model: str) -> LossSeries:
    """The history's (step, loss) points, in step order; raises when the model does not exist or
    has trained nothing yet."""
    keys = ModelKeys(model)
    pipe = client.pipeline(transaction=False)
    pipe.hget(keys.ckpt, "version")
    pipe.lrange(keys.history, 0, -1)
    version, raw = pipe.execute()
    if version is None:
        raise ModelNotInitialisedError(f"model {model!r} does not exist; `itrain models` lists the models")
    points = sorted(
        (int(e["step"]), float(e["loss"]))
        for e in (orjson.loads(item) for item in raw)
        if isinstance(e, dict) and isinstance(e.get("step"), int) and isinstance(e.get("loss"), int | float)
    )
    if not points:
        raise ModelNotInitialisedError(f"model {model!r} has no training history yet: nothing to plot")
    return LossSeries(model, [s for s, _ in points], [v for _, v in points])


def moving_average(values: list[float], window: int) -> list[float]:
    """The mean of the last ``window`` values at each point (fewer at the start)."""
    out: list[float] = []
    total = 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_loss(series: LossSeries, out: Path, window: int = 50) -> Path:
    """Draw the per-event loss and its moving average over ``window`` events into ``out`` (PNG)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.5), dpi=110)
    try:
        ax.plot(series.steps, series.losses, ".", markersize=2, alpha=0.35, label="loss per event")
        # From the first full window on (the first few points would average a handful of events),
        # unless the history is shorter than one window.
        first = window - 1 if len(series.losses) >= window else 0
        ax.plot(
            series.steps[first:],
            moving_average(series.losses, window)[first:],
            linewidth=2,
            label=f"moving average ({window} events)",
        )
        ax.set_xlabel("step (events trained)")
        ax.set_ylabel("loss before the update")
        ax.set_title(f"model {series.model}: the last {len(series.steps)} trained events")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out, format="png")
    finally:
        plt.close(fig)
    return out


def _pyplot() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only: no display needed
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ConfigurationError(INSTALL_HINT) from exc
    return plt
