"""Online evaluation, the trainer's side: each trained batch's records and the model's new state.

Test-then-train: every event's prediction and loss come from the weights before its own update
(the kernel writes them), so each event is scored on data the model had not seen. The state's
layout and the metrics read from it are in ``producer.evaluation``; this module makes a batch's
records and the next state (pure functions over numpy arrays). The trainer writes the state in the
same fenced commit as the weights, so the figures always describe the committed weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt
import orjson

from producer.evaluation import MAX_ACTIONS, OTHER_ACTION, RECORD
from worker.engine.guard import Window, worst_window
from worker.engine.jit import compile_cached

__all__ = [
    "COLUMNS",
    "EvalState",
    "EvalUpdate",
    "advance",
    "decode_state",
    "guard_loss",
    "recent_losses",
    "records",
]

Array = npt.NDArray[np.float64]
#: loss, squared error, prediction, target, binary targets, correct, action id (``RECORD``).
COLUMNS = 7
_LOSS = 0


@dataclass(slots=True)
class EvalState:
    """A model's online evaluation as committed: where the window is, and the sums since creation.

    ``ring`` (the window's records) is held only for a model with a guard, which needs the log
    losses of its last events at every commit; for any other model the commit script writes the
    new records at their place and no worker reads them back.
    """

    cap: int
    #: Events in the window since it last restarted; the ring holds the last ``min(wn, cap)``.
    wn: int = 0
    ring: Array | None = None
    actions: list[str] = field(default_factory=list)
    total: list[float] = field(default_factory=lambda: [0.0] * 5)
    by_action: dict[str, list[float]] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class EvalUpdate:
    """What a commit writes: the new state (cached once the commit lands), its JSON, and the
    window's new records as (byte offset in the ring, bytes) segments."""

    state: EvalState
    json: bytes
    segments: list[tuple[int, bytes]]
    #: The window's log loss, the guard's reference candidate (``guard_loss``): when the model has
    #: a guard and the window holds at least the guard's window of events.
    guard_loss: float | None
    #: The worst window of the guard's width that ends in this batch (``guard.worst_window``),
    #: when the model has a guard and a window is full.
    worst: Window | None = None


def decode_state(
    state: bytes | None, wn: bytes | None, cap: bytes | None, ring: bytes | None, default_cap: int
) -> EvalState:
    """The committed state (``ring`` decoded when given, i.e. when the model has a guard)."""
    out = EvalState(int(cap) if cap else default_cap, int(wn or 0))
    if state:
        info = orjson.loads(state)
        out.actions = list(info["actions"])
        out.total = [float(v) for v in info["total"]]
        out.by_action = {k: [float(v) for v in sums] for k, sums in info["by_action"].items()}
    if ring is not None:
        out.ring = np.zeros((out.cap, COLUMNS))
        raw = ring[: out.cap * RECORD.size]
        raw = raw[: len(raw) - len(raw) % RECORD.size]
        if raw:
            flat = np.frombuffer(raw, dtype="<f8").reshape(-1, COLUMNS)
            out.ring[: len(flat)] = flat
    return out


def _records_loop(
    P: Array, Y: Array, losses: Array, ids: npt.NDArray[np.intp], out: Array, sums: Array
) -> None:
    """Fill ``out`` with one record per event and add each to its action's row of ``sums``
    (count, loss, squared error, binary targets, correct): one compiled pass, as a batch of one
    event (``train_step``) would pay numpy's call overhead a dozen times."""
    k = P.shape[1]
    for e in range(P.shape[0]):
        se = 0.0
        binary = 0.0
        correct = 0.0
        for j in range(k):
            p, t = P[e, j], Y[e, j]
            se += (p - t) * (p - t)
            if t == 0.0 or t == 1.0:
                binary += 1.0
                if (p >= 0.5) == (t == 1.0):
                    correct += 1.0
        se /= k
        out[e, 0] = losses[e]
        out[e, 1] = se
        out[e, 2] = P[e, 0]
        out[e, 3] = Y[e, 0]
        out[e, 4] = binary
        out[e, 5] = correct
        out[e, 6] = ids[e]
        a = ids[e]
        sums[a, 0] += 1.0
        sums[a, 1] += losses[e]
        sums[a, 2] += se
        sums[a, 3] += binary
        sums[a, 4] += correct


_records_compiled = compile_cached(_records_loop)


def records(
    P: Array, Y: Array, losses: Array, action_ids: npt.NDArray[np.intp], n_actions: int
) -> tuple[Array, Array]:
    """One record per trained event (``producer.evaluation.RECORD``), from its predictions ``P``
    and targets ``Y`` (rows, outputs), its loss and its action's id; and the per-action sums of
    the batch, one row per action id: count, loss, squared error, binary targets, correct."""
    out = np.empty((len(losses), COLUMNS))
    sums = np.zeros((n_actions, 5))
    _records_compiled(
        np.require(P, np.float64, ["C"]),
        np.require(Y, np.float64, ["C"]),
        np.require(losses, np.float64, ["C"]),
        np.require(action_ids, np.intp, ["C"]),
        out,
        sums,
    )
    return out, sums


def _action_ids(state: EvalState, actions: list[str]) -> tuple[list[str], npt.NDArray[np.intp]]:
    """The ring's action table after ``actions`` (new names added up to ``MAX_ACTIONS``, the rest
    as ``OTHER_ACTION``) and each action's id."""
    names = list(state.actions)
    index = {name: i for i, name in enumerate(names)}
    ids = np.empty(len(actions), dtype=np.intp)
    for k, name in enumerate(actions):
        i = index.get(name)
        if i is None:
            if len(names) >= MAX_ACTIONS:
                name = OTHER_ACTION
                i = index.get(name)
            if i is None:
                i = index[name] = len(names)
                names.append(name)
        ids[k] = i
    return names, ids


def guard_loss(ring: Array, wn: int, window: int) -> float | None:
    """The mean log loss over the evaluation window (its last ``min(wn, cap)`` events), once it
    holds at least ``window`` events: the figure a snapshot keeps for the guard's reference."""
    cap = len(ring)
    if window <= 0 or window > cap or wn < window:
        return None
    return float(recent_losses(ring, wn, cap).mean())


def recent_losses(ring: Array, wn: int, k: int) -> Array:
    """The log losses of the window's last ``min(k, wn, cap)`` events, oldest first."""
    cap = len(ring)
    k = min(k, wn, cap)
    if k <= 0:
        return np.empty(0)
    start = (wn - k) % cap
    if start + k <= cap:
        return ring[start : start + k, _LOSS]
    return np.concatenate((ring[start:, _LOSS], ring[: start + k - cap, _LOSS]))


def _place(recs: Array, wn: int, cap: int) -> tuple[list[tuple[int, Array]], Array]:
    """Where the new records go in the ring: (first slot, rows) runs, and the rows that land
    (only the last ``cap`` when the batch is longer than the window)."""
    n = len(recs)
    if n >= cap:
        full = np.empty((cap, COLUMNS))
        full[(wn + n - cap + np.arange(cap)) % cap] = recs[-cap:]
        return [(0, full)], full
    start = wn % cap
    split = cap - start
    if n <= split:
        return [(start, recs)], recs
    return [(start, recs[:split]), (0, recs[split:])], recs


def advance(
    state: EvalState, P: Array, Y: Array, losses: Array, actions: list[str], guard_window: int
) -> EvalUpdate:
    """The state after a batch of trained events, in training order (pure: ``state`` is kept)."""
    worst = None
    if state.ring is not None and guard_window > 0:
        # Before the ring takes the batch: the windows that straddle the last commit begin there.
        worst = worst_window(recent_losses(state.ring, state.wn, guard_window - 1), losses, guard_window)
    names, ids = _action_ids(state, actions)
    recs, per_action = records(P, Y, losses, ids, len(names))
    n, cap = len(recs), state.cap
    runs, _ = _place(recs, state.wn, cap)
    ring = None
    if state.ring is not None:
        ring = state.ring.copy()
        for first, rows in runs:
            ring[first : first + len(rows)] = rows
    rows = per_action.tolist()
    total = list(state.total)
    by_action = dict(state.by_action)
    for i, add in enumerate(rows):
        if add[0]:
            old = by_action.get(names[i], [0.0] * 5)
            by_action[names[i]] = [a + b for a, b in zip(old, add, strict=True)]
            total = [a + b for a, b in zip(total, add, strict=True)]
    wn = state.wn + n
    g = guard_loss(ring, wn, guard_window) if ring is not None else None
    info = {"actions": names, "total": total, "by_action": by_action}
    return EvalUpdate(
        EvalState(cap, wn, ring, names, total, by_action),
        orjson.dumps(info),
        [(first * RECORD.size, rows.tobytes()) for first, rows in runs],
        g,
        worst,
    )
