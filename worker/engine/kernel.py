"""The exact per-event SGD step over a whole batch, compiled with numba.

The same arithmetic as ``mlp.PerEventSGD.step`` (the numpy reference; tests hold the two equal
within 1e-12): tanh hidden layer, sigmoid outputs, binary cross-entropy from the logits, the
gradient clipped by its global norm, and an update refused when the loss, the gradient or the new
weights would not be finite. A refused event fails alone: the weights stay as they were before
it and the next event continues from them.

Compiled on first call and cached on disk (``NUMBA_CACHE_DIR``, else ``__pycache__`` beside this
file or the user's cache directory). ``warm_up`` compiles it in the worker's main process before
the pool forks, so pool processes inherit the machine code and never compile.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import numpy as np
import numpy.typing as npt

from producer.errors import NonFiniteUpdateError
from worker.engine.evaluation import EvalState, advance
from worker.engine.jit import compile_cached
from worker.engine.mlp import MAX_STEP_NORM, PerEventSGD, Shape, forward, sigmoid

__all__ = ["per_event_steps", "per_event_steps_reference", "warm_up"]

Array = npt.NDArray[np.float64]
logger = logging.getLogger("itrain.kernel")

# Per-event status codes written by the compiled loop.
_OK = 0
_BAD_LOGIT = 1
_BAD_GRADIENT = 2
_BAD_UPDATE = 3


def _dot_py(a: Array, i: int, b: Array, j: int, n: int) -> float:
    """``a[i:i+n] . b[j:j+n]`` in four running sums: a chain of dependent additions would wait on
    each other, four independent ones keep the CPU busy (order differs from BLAS's by rounding)."""
    s0 = s1 = s2 = s3 = 0.0
    m = 0
    while m + 4 <= n:
        s0 += a[i + m] * b[j + m]
        s1 += a[i + m + 1] * b[j + m + 1]
        s2 += a[i + m + 2] * b[j + m + 2]
        s3 += a[i + m + 3] * b[j + m + 3]
        m += 4
    while m < n:
        s0 += a[i + m] * b[j + m]
        m += 1
    return (s0 + s1) + (s2 + s3)


def _sgd_loop(
    theta: Array,
    inputs: int,
    hidden: int,
    outputs: int,
    X: Array,
    T: Array,
    lr: float,
    clip: float,
    max_step: float,
    losses: Array,
    status: npt.NDArray[np.int8],
    logit: Array,
    preds: Array,
) -> None:
    """One exact SGD step per row of ``X``, in place on ``theta`` (layout W1 | b1 | W2 | b2).

    Writes each row's loss and prediction (sigmoid outputs) before its update, its status and, for
    a non-finite logit, that logit.
    """
    n_in, n_h, k = inputs, hidden, outputs
    o_b1 = n_h * n_in
    o_w2 = o_b1 + n_h
    o_b2 = o_w2 + k * n_h
    size = o_b2 + k
    h = np.empty(n_h)
    dz = np.empty(k)
    dh = np.empty(n_h)
    grad = np.empty(size)
    new = np.empty(size)
    for e in range(X.shape[0]):
        x = X[e]
        # a = tanh(W1 x + b1)
        for r in range(n_h):
            acc = 0.0
            for c in range(n_in):
                acc += theta[r * n_in + c] * x[c]
            h[r] = math.tanh(acc + theta[o_b1 + r])
        # z = W2 a + b2; the loss and dL/dz per output
        loss = 0.0
        bad = False
        for j in range(k):
            zj = _dot(theta, o_w2 + j * n_h, h, 0, n_h) + theta[o_b2 + j]
            if not math.isfinite(zj):
                status[e] = _BAD_LOGIT
                logit[e] = zj
                bad = True
                break
            tj = T[e, j]
            loss += max(zj, 0.0) - tj * zj + math.log1p(math.exp(-abs(zj)))
            pj = 0.5 * (1.0 + math.tanh(0.5 * zj))
            preds[e, j] = pj
            dz[j] = (pj - tj) / k
        if bad:
            continue
        loss /= k
        # The gradient: W2 and b2; then dh = (dz W2) * (1 - a^2), back through tanh, to W1 and b1.
        dh[:] = 0.0
        for j in range(k):
            d = dz[j]
            row = o_w2 + j * n_h
            for r in range(n_h):
                grad[row + r] = d * h[r]
                dh[r] += d * theta[row + r]
            grad[o_b2 + j] = d
        for r in range(n_h):
            g = dh[r] * (1.0 - h[r] * h[r])
            for c in range(n_in):
                grad[r * n_in + c] = g * x[c]
            grad[o_b1 + r] = g
        sq = _dot(grad, 0, grad, 0, size)
        if not math.isfinite(sq):
            status[e] = _BAD_GRADIENT
            continue
        scale = lr
        if clip > 0 and sq > clip * clip:
            scale *= clip / math.sqrt(sq)
        if not scale * math.sqrt(sq) <= max_step:
            status[e] = _BAD_UPDATE
            continue
        for m in range(size):
            new[m] = grad[m] * -scale + theta[m]
        # One sum of squares checks every value: NaN or inf anywhere makes it non-finite.
        if not math.isfinite(_dot(new, 0, new, 0, size)):
            status[e] = _BAD_UPDATE
            continue
        theta[:] = new
        losses[e] = loss
        status[e] = _OK


# ``_sgd_loop`` finds ``_dot`` among the globals when it is compiled: it must be a compiled one.
_dot: Any = compile_cached(_dot_py)
_compiled = compile_cached(_sgd_loop)


def per_event_steps(
    theta: Array,
    shape: Shape,
    X: Array,
    T: Array,
    lr: float,
    clip: float,
    predictions: Array | None = None,
) -> list[float | NonFiniteUpdateError]:
    """Train on the rows of ``X`` (targets ``T``) one after the other, in place on ``theta``.

    One entry per row: the loss before its update, or the ``NonFiniteUpdateError`` that refused it
    (the weights then stay as they were before that row). ``theta`` must be a writable, contiguous
    float64 vector of ``shape.size`` values. ``predictions``, when given, a writable (rows,
    outputs) float64 matrix, receives each row's prediction before its update (the online
    evaluation's "test" of test-then-train).
    """
    n = X.shape[0]
    if X.shape != (n, shape.inputs) or T.shape != (n, shape.outputs) or theta.shape != (shape.size,):
        raise ValueError(
            f"shapes do not match the network {shape}: theta {theta.shape}, X {X.shape}, T {T.shape}"
        )
    if not (theta.flags.c_contiguous and theta.flags.writeable and theta.dtype == np.float64):
        raise ValueError("theta must be a writable, contiguous float64 vector (it is updated in place)")
    # One compiled signature only: writable C-contiguous float64 matrices, Python ints and floats
    # (a copy only when the caller's arrays are not already so: this runs inside the lock).
    X = np.require(X, np.float64, ["C", "W"])
    T = np.require(T, np.float64, ["C", "W"])
    losses = np.zeros(n)
    status = np.zeros(n, dtype=np.int8)
    logit = np.zeros(n)
    if predictions is None:
        predictions = np.empty((n, shape.outputs))
    elif predictions.shape != (n, shape.outputs) or not (
        predictions.flags.c_contiguous and predictions.flags.writeable and predictions.dtype == np.float64
    ):
        raise ValueError(
            f"predictions must be a writable, contiguous float64 matrix of shape {(n, shape.outputs)}"
        )
    _compiled(
        theta,
        int(shape.inputs),
        int(shape.hidden),
        int(shape.outputs),
        X,
        T,
        float(lr),
        float(clip),
        float(MAX_STEP_NORM),
        losses,
        status,
        logit,
        predictions,
    )
    out: list[float | NonFiniteUpdateError] = [*losses.tolist()]
    if status.any():
        for e in np.flatnonzero(status).tolist():
            out[e] = _refusal(int(status[e]), float(logit[e]), lr)
    return out


def per_event_steps_reference(
    theta: Array,
    shape: Shape,
    X: Array,
    T: Array,
    lr: float,
    clip: float,
    predictions: Array | None = None,
) -> list[float | NonFiniteUpdateError]:
    """``per_event_steps`` with the numpy kernel (``PerEventSGD``): the reference it is tested against."""
    kernel = PerEventSGD(shape, lr, clip, theta)
    out: list[float | NonFiniteUpdateError] = []
    for e, (x, t) in enumerate(zip(X, T, strict=True)):
        if predictions is not None:
            _, z = forward(theta, shape, x[None, :])
            predictions[e] = sigmoid(z[0])
        try:
            out.append(kernel.step(x, t.tolist()))
        except NonFiniteUpdateError as exc:
            out.append(exc)
    return out


def warm_up() -> None:
    """Compile the kernel and the online evaluation's loop (or load them from the cache) now, on
    a tiny batch."""
    shape = Shape(1, 1, 1)
    per_event_steps(np.zeros(shape.size), shape, np.zeros((1, 1)), np.zeros((1, 1)), 0.1, 1.0)
    advance(EvalState(1), np.zeros((1, 1)), np.zeros((1, 1)), np.zeros(1), ["warm-up"], 0)


def _refusal(code: int, logit: float, lr: float) -> NonFiniteUpdateError:
    # The same messages as the numpy kernel's.
    if code == _BAD_LOGIT:
        return NonFiniteUpdateError(f"non-finite logit ({logit})")
    if code == _BAD_GRADIENT:
        return NonFiniteUpdateError("non-finite gradient")
    return NonFiniteUpdateError(f"update with learning rate {lr:g} would make the weights non-finite")
