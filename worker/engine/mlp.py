"""The network: a 4 -> hidden (tanh) -> outputs (sigmoid) MLP, its loss and its gradient.

Pure functions over one flat float64 parameter vector ``theta`` (the checkpoint's raw bytes), laid
out as ``W1 (H, I) | b1 (H) | W2 (K, H) | b2 (K)``. Loss: binary cross-entropy from the logits,
averaged over the outputs. Nothing here touches Redis.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from producer.errors import NonFiniteUpdateError

__all__ = [
    "MAX_STEP_NORM",
    "Params",
    "PerEventSGD",
    "Shape",
    "bce_with_logits",
    "clip_by_norm",
    "forward",
    "init_params",
    "loss_and_grad",
    "minibatch_step",
    "sgd_update",
    "unpack",
]

Array = npt.NDArray[np.float64]
#: No single update may move the weights further than this: beyond it the weights are ruined
#: even if still finite, and the finiteness check itself would overflow.
MAX_STEP_NORM = 1e150


@dataclass(frozen=True, slots=True)
class Shape:
    """Layer sizes: inputs -> hidden -> outputs."""

    inputs: int
    hidden: int
    outputs: int

    @property
    def size(self) -> int:
        h, i, k = self.hidden, self.inputs, self.outputs
        return h * i + h + k * h + k


@dataclass(frozen=True, slots=True)
class Params:
    """Views into a flat vector; writing to them writes the vector."""

    W1: Array
    b1: Array
    W2: Array
    b2: Array


def unpack(theta: Array, shape: Shape) -> Params:
    h, i, k = shape.hidden, shape.inputs, shape.outputs
    a = h * i
    b = a + h
    c = b + k * h
    return Params(theta[:a].reshape(h, i), theta[a:b], theta[b:c].reshape(k, h), theta[c : c + k])


def init_params(shape: Shape, seed: int) -> Array:
    """Seeded Glorot-uniform weights, zero biases."""
    rng = np.random.default_rng(seed)
    theta = np.zeros(shape.size, dtype=np.float64)
    p = unpack(theta, shape)
    for w in (p.W1, p.W2):
        fan_out, fan_in = w.shape
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        w[...] = rng.uniform(-limit, limit, size=w.shape)
    return theta


def forward(theta: Array, shape: Shape, X: Array) -> tuple[Array, Array]:
    """Hidden activations and logits for a (B, inputs) batch."""
    p = unpack(theta, shape)
    H = np.tanh(X @ p.W1.T + p.b1)  # a = tanh(W1 x + b1)
    Z = H @ p.W2.T + p.b2  # z = W2 a + b2
    return H, Z


def sigmoid(z: Array) -> Array:
    return 0.5 * (1.0 + np.tanh(0.5 * z))  # no overflow for large |z|


def bce_with_logits(Z: Array, T: Array) -> Array:
    """Per-example binary cross-entropy, mean over outputs; stable for any finite logit."""
    # log(1 + e^z) - t z, written so that e^z never overflows
    losses: Array = np.mean(np.maximum(Z, 0.0) - T * Z + np.log1p(np.exp(-np.abs(Z))), axis=-1)
    return losses


def loss_and_grad(
    theta: Array, shape: Shape, X: Array, T: Array, predictions: Array | None = None
) -> tuple[Array, Array]:
    """Per-example losses and the gradient of their mean with respect to ``theta``; the sigmoid
    outputs go into ``predictions`` when given (a (B, outputs) matrix)."""
    p = unpack(theta, shape)
    B = X.shape[0]
    H, Z = forward(theta, shape, X)
    losses = bce_with_logits(Z, T)
    grad = np.empty_like(theta)
    g = unpack(grad, shape)
    P = sigmoid(Z)
    if predictions is not None:
        predictions[...] = P
    dZ = (P - T) / (shape.outputs * B)  # dL/dz for sigmoid + cross-entropy
    g.W2[...] = dZ.T @ H
    g.b2[...] = dZ.sum(axis=0)
    dH = (dZ @ p.W2) * (1.0 - H * H)  # back through tanh
    g.W1[...] = dH.T @ X
    g.b1[...] = dH.sum(axis=0)
    return losses, grad


def clip_by_norm(grad: Array, max_norm: float) -> Array:
    """Scale ``grad`` in place so its L2 norm is at most ``max_norm`` (0 disables)."""
    if max_norm > 0:
        norm = float(np.sqrt(grad @ grad))
        if norm > max_norm:
            grad *= max_norm / norm
    return grad


def sgd_update(theta: Array, grad: Array, lr: float) -> Array:
    """``theta - lr * grad`` as a new vector, refused if it would be non-finite or absurdly large."""
    with np.errstate(over="ignore", invalid="ignore"):
        step = lr * math.sqrt(float(grad @ grad))
        new = theta - lr * grad
        ok = step <= MAX_STEP_NORM and math.isfinite(float(new @ new))
    if not ok:
        raise NonFiniteUpdateError(f"update with learning rate {lr:g} would make the weights non-finite")
    return new


class PerEventSGD:
    """Exact sequential SGD, one update per example, in place on the weights it was given.

    The same arithmetic as ``loss_and_grad`` + ``clip_by_norm`` + ``sgd_update`` on one example
    (a test keeps them equal): the numpy reference that the compiled kernel the trainer runs
    (``kernel.per_event_steps``) is tested against. Views and scratch buffers are made once per
    batch, the per-output maths is plain floats, and no call allocates a matrix.
    """

    def __init__(self, shape: Shape, lr: float, clip: float, theta: Array) -> None:
        self.shape = shape
        self.lr = lr
        self.clip = clip
        self.theta = theta
        self._p = unpack(theta, shape)
        self._grad = np.empty(shape.size, dtype=np.float64)
        self._g = unpack(self._grad, shape)
        self._new = np.empty(shape.size, dtype=np.float64)
        self._dz = np.empty((shape.outputs, 1), dtype=np.float64)

    def step(self, x: Array, t: list[float]) -> float:
        """Update the weights in place on one example; returns the loss before the update.

        Raises ``NonFiniteUpdateError`` and leaves the weights unchanged when the loss, the
        gradient or the updated weights would not be finite.
        """
        p, g, k = self._p, self._g, self.shape.outputs
        h = p.W1.dot(x)
        h += p.b1
        np.tanh(h, out=h)  # a = tanh(W1 x + b1)
        z = (p.W2.dot(h) + p.b2).tolist()  # z = W2 a + b2
        loss = 0.0
        dz = self._dz
        for j in range(k):
            zj, tj = z[j], t[j]
            if not math.isfinite(zj):
                raise NonFiniteUpdateError(f"non-finite logit ({zj})")
            loss += max(zj, 0.0) - tj * zj + math.log1p(math.exp(-abs(zj)))
            dz[j, 0] = (0.5 * (1.0 + math.tanh(0.5 * zj)) - tj) / k  # dL/dz
        loss /= k
        np.multiply(dz, h, out=g.W2)
        g.b2[...] = dz[:, 0]
        dh = dz[:, 0].dot(p.W2)
        dh *= 1.0 - h * h  # back through tanh
        np.multiply(dh[:, None], x, out=g.W1)
        g.b1[...] = dh
        sq = float(self._grad.dot(self._grad))
        if not math.isfinite(sq):
            raise NonFiniteUpdateError("non-finite gradient")
        scale = self.lr
        if self.clip > 0 and sq > self.clip * self.clip:
            scale *= self.clip / math.sqrt(sq)
        if not scale * math.sqrt(sq) <= MAX_STEP_NORM:
            raise NonFiniteUpdateError(
                f"update with learning rate {self.lr:g} would make the weights non-finite"
            )
        new = self._new
        np.multiply(self._grad, -scale, out=new)
        new += self.theta
        # One dot product checks every value: NaN or inf anywhere makes it non-finite.
        if not math.isfinite(float(new.dot(new))):
            raise NonFiniteUpdateError(
                f"update with learning rate {self.lr:g} would make the weights non-finite"
            )
        self.theta[...] = new
        return loss


def minibatch_step(
    theta: Array, shape: Shape, X: Array, T: Array, lr: float, clip: float, predictions: Array | None = None
) -> tuple[Array, Array]:
    """One vectorised SGD step on the mean loss of a batch.

    Returns the new weights and the per-example losses before the update; ``predictions``, when
    given, receives the predictions before the update (the online evaluation's). Raises
    ``NonFiniteUpdateError`` (weights untouched) when the step would not be finite.
    """
    losses, grad = loss_and_grad(theta, shape, X, T, predictions)
    if not (np.isfinite(losses).all() and np.isfinite(grad).all()):
        raise NonFiniteUpdateError("non-finite loss or gradient in the mini-batch")
    return sgd_update(theta, clip_by_norm(grad, clip), lr), losses
