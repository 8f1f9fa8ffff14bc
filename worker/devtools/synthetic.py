"""Synthetic interaction events for ``itrain produce``, the quickstart and the benchmark."""

from __future__ import annotations

import random
import time
import uuid
from collections.abc import Mapping
from typing import Any

__all__ = ["ACTIONS", "synthetic_events"]

#: Action types and how often each occurs; all have a default target.
ACTIONS: tuple[tuple[str, float], ...] = (
    ("view", 0.55),
    ("click", 0.25),
    ("dismiss", 0.1),
    ("like", 0.05),
    ("purchase", 0.05),
)


def synthetic_events(
    n: int,
    *,
    users: int = 1000,
    model: str = "default",
    seed: int | None = None,
    labels: Mapping[str, float] | None = None,
) -> list[dict[str, Any]]:
    """``n`` plain-dict events from ``users`` users, timestamps spread over the last day; with
    ``labels``, each carries the label given for its action (a guard drill sends flipped ones)."""
    rng = random.Random(seed)
    names = [a for a, _ in ACTIONS]
    weights = [w for _, w in ACTIONS]
    now = time.time()
    actions = rng.choices(names, weights, k=n)
    return [
        {
            "event_id": str(uuid.UUID(int=rng.getrandbits(128), version=4)),
            "user_id": f"user-{rng.randrange(users)}",
            "action_type": action,
            "timestamp": now - rng.random() * 86400.0,
            "context": {"page": rng.choice(("home", "search", "item"))} if rng.random() < 0.5 else None,
            "model": model,
            **({"label": labels[action]} if labels is not None else {}),
        }
        for action in actions
    ]
