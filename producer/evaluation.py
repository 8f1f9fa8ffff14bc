"""Online evaluation (test-then-train): the metrics of each event's prediction made before its update.

Pure functions over the state the trainer writes with every commit (``worker.engine.evaluation``
makes it; ``itrain stats``, ``TrainingClient.stats``, ``itrain snapshots`` and ``itrain exporter``
read it through here). No numpy: a service that only publishes can read the figures too.

The state, in the checkpoint hash and one string key:

- ``eval`` (JSON): ``actions`` (the action names the ring's records point to, at most
  ``MAX_ACTIONS`` then ``_other``), ``total`` and ``by_action`` (sums since the model was created).
- ``eval_cap``: the window, how many of the latest events it holds (``ITRAIN_EVAL_WINDOW`` when
  the model first trained, widened to a guard's window).
- ``eval_wn``: events in the window since it last restarted (a rollback, a resume and a new guard
  restart it); the window holds the last ``min(eval_wn, eval_cap)`` of them.
- ``itrain:{m}:eval`` (string): the ring, ``eval_cap`` records of ``RECORD`` (little-endian
  float64: loss, squared error, prediction, target, binary targets, correct, action id); event
  ``k`` since the restart is record ``k % eval_cap``. A snapshot keeps a copy (``eval_ring``).

Sums are ``[count, log loss, squared error, binary targets, correct]``. Per event, the log loss
and the squared error are means over the model's outputs; accuracy (at 0.5) counts only the
outputs whose target is 0 or 1 (a ``view`` at 0.5 counts in log loss and squared error only); the
AUC is defined for single-output models, over the window's events whose target is 0 or 1, when
both classes are present.
"""

from __future__ import annotations

import struct
from typing import Any

import orjson

__all__ = [
    "MAX_ACTIONS",
    "OTHER_ACTION",
    "RECORD",
    "auc",
    "decode_ring",
    "eval_report",
    "metrics",
    "window_metrics",
    "window_records",
]

#: One ring record: loss, squared error, prediction, target, binary targets, correct, action id.
RECORD = struct.Struct("<7d")
#: Action names tracked apiece (as the per-action counters); the rest count as ``OTHER_ACTION``.
MAX_ACTIONS = 256
OTHER_ACTION = "_other"

Sums = list[float]
Record = tuple[float, float, float, float, float, float, float]


def metrics(sums: Sums) -> dict[str, Any]:
    """Count, log loss, mean squared error and accuracy from ``[n, loss, se, binary, correct]``
    (a figure with nothing to average is ``None``)."""
    n, loss, se, binary, correct = sums
    return {
        "count": int(n),
        "logloss": loss / n if n else None,
        "mse": se / n if n else None,
        "accuracy": correct / binary if binary else None,
    }


def auc(pairs: list[tuple[float, float]]) -> float | None:
    """The area under the ROC curve of (prediction, 0/1 target) pairs: the chance that a positive
    scores above a negative, ties counting a half (rank statistic, average ranks for ties)."""
    positives = sum(1 for _, t in pairs if t == 1.0)
    negatives = len(pairs) - positives
    if not positives or not negatives:
        return None
    ordered = sorted(pairs)
    rank_sum, i = 0.0, 0
    while i < len(ordered):
        j = i
        while j + 1 < len(ordered) and ordered[j + 1][0] == ordered[i][0]:
            j += 1
        rank = (i + j) / 2 + 1  # the average rank of a run of ties
        rank_sum += rank * sum(1 for k in range(i, j + 1) if ordered[k][1] == 1.0)
        i = j + 1
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


def decode_ring(raw: bytes | None, cap: int) -> list[Record]:
    """The ring's ``cap`` records (missing ones, after a restart, are zeros)."""
    raw = (raw or b"")[: cap * RECORD.size]
    raw += bytes(cap * RECORD.size - len(raw))
    return list(RECORD.iter_unpack(raw))


def window_records(ring: list[Record], wn: int) -> list[Record]:
    """The records of the window: the first ``min(wn, cap)`` slots (the ring fills from slot 0)."""
    return ring[: min(wn, len(ring))]


def _sums(records: list[Record]) -> Sums:
    return [
        float(len(records)),
        sum(r[0] for r in records),
        sum(r[1] for r in records),
        sum(r[4] for r in records),
        sum(r[5] for r in records),
    ]


def window_metrics(ring: bytes | None, wn: bytes | int | None, cap: int) -> dict[str, Any]:
    """Count, log loss, mean squared error and accuracy over a window (a snapshot's, for one)."""
    return metrics(_sums(window_records(decode_ring(ring, cap), int(wn or 0))))


def _scope(records: list[Record], single_output: bool) -> dict[str, Any]:
    out = metrics(_sums(records))
    out["auc"] = auc([(r[2], r[3]) for r in records if r[4] == 1.0]) if single_output else None
    return out


def eval_report(
    state: bytes | None, wn: bytes | None, cap: bytes | None, ring: bytes | None, outputs: int
) -> dict[str, Any]:
    """The ``eval`` of ``itrain stats``: windowed metrics (with AUC) and since-creation ones, for
    the model and per action (counts of 0 and ``None`` figures before it trained anything;
    ``window`` is ``None`` until its first commit or guard fixes it)."""
    info: dict[str, Any] = (
        orjson.loads(state) if state else {"total": [0.0] * 5, "actions": [], "by_action": {}}
    )
    records = window_records(decode_ring(ring, int(cap)), int(wn or 0)) if cap else []
    single = outputs == 1
    report = {"window": int(cap) if cap else None, **_scope(records, single), "total": metrics(info["total"])}
    names: list[str] = info["actions"]
    grouped: dict[str, list[Record]] = {}
    for r in records:  # one pass over the window, whatever the number of actions
        grouped.setdefault(names[int(r[6])], []).append(r)
    by_action: dict[str, Any] = {}
    for name, sums in sorted(info["by_action"].items()):
        by_action[name] = {**_scope(grouped.get(name, []), single), "total": metrics(sums)}
    report["by_action"] = by_action
    return report
