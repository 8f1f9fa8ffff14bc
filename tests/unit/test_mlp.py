"""Unit tests of the network (``worker.engine.mlp``): gradient, kernels, clipping, refusal, init."""

from __future__ import annotations

import numpy as np
import pytest

from producer.errors import ItrainError, NonFiniteUpdateError
from tests.helpers import problem
from worker.engine.mlp import (
    PerEventSGD,
    Shape,
    bce_with_logits,
    clip_by_norm,
    forward,
    init_params,
    loss_and_grad,
    minibatch_step,
    sgd_update,
    sigmoid,
    unpack,
)

# (inputs, hidden, outputs, batch)
SHAPES = [(4, 3, 1, 1), (4, 5, 3, 1), (4, 6, 2, 7), (2, 3, 1, 4), (4, 16, 1, 5)]


def naive_loss(theta, shape, X, T):
    """Cross-entropy written the textbook way (fine for moderate logits)."""
    _, Z = forward(theta, shape, X)
    p = 1.0 / (1.0 + np.exp(-Z))
    return np.mean(-(T * np.log(p) + (1.0 - T) * np.log(1.0 - p)), axis=-1)


# -- loss and gradient ----------------------------------------------------------------------------


@pytest.mark.parametrize("dims", SHAPES, ids=[str(s) for s in SHAPES])
def test_loss_matches_textbook_cross_entropy(dims) -> None:
    """Per-example losses are the mean binary cross-entropy over outputs."""
    # Given a random problem
    shape, theta, X, T = problem(*dims)
    # When losses are computed
    losses, _ = loss_and_grad(theta, shape, X, T)
    # Then they match the textbook formula
    assert losses.shape == (dims[3],)
    np.testing.assert_allclose(losses, naive_loss(theta, shape, X, T), rtol=1e-12, atol=1e-12)


def test_bce_is_finite_for_huge_logits() -> None:
    """The stable form never overflows: loss of a huge wrong logit is about |z|."""
    # Given huge logits, right and wrong
    Z = np.array([[1000.0], [-1000.0], [1000.0]])
    T = np.array([[1.0], [1.0], [0.0]])
    # When the loss is computed
    losses = bce_with_logits(Z, T)
    # Then it is finite: ~0 when right, ~1000 when wrong
    assert np.isfinite(losses).all()
    np.testing.assert_allclose(losses, [0.0, 1000.0, 1000.0], atol=1e-9)


@pytest.mark.parametrize("dims", SHAPES, ids=[str(s) for s in SHAPES])
def test_gradient_matches_finite_differences(dims) -> None:
    """The analytic gradient of the mean loss equals central finite differences."""
    # Given a random problem
    shape, theta, X, T = problem(*dims, seed=sum(dims))
    eps = 1e-6

    def mean_loss(th):
        return float(loss_and_grad(th, shape, X, T)[0].mean())

    # When the gradient is computed analytically and numerically
    _, grad = loss_and_grad(theta, shape, X, T)
    numeric = np.empty_like(theta)
    for j in range(theta.size):
        plus, minus = theta.copy(), theta.copy()
        plus[j] += eps
        minus[j] -= eps
        numeric[j] = (mean_loss(plus) - mean_loss(minus)) / (2 * eps)
    # Then they agree everywhere (and the gradient is not trivially zero)
    assert grad.shape == theta.shape
    assert np.abs(grad).max() > 1e-3
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-8)


def test_batch_gradient_is_mean_of_example_gradients() -> None:
    """The batch gradient is the average of the per-example gradients."""
    # Given a batch
    shape, theta, X, T = problem(4, 6, 2, 5, seed=3)
    # When the gradient is computed on the batch and on each example
    losses, grad = loss_and_grad(theta, shape, X, T)
    per = [loss_and_grad(theta, shape, X[i : i + 1], T[i : i + 1]) for i in range(5)]
    # Then the batch's is their mean, and its losses are theirs
    np.testing.assert_allclose(grad, np.mean([g for _, g in per], axis=0), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(losses, [lo[0] for lo, _ in per], rtol=1e-12)


def test_unpack_views_write_the_flat_vector() -> None:
    """``unpack`` returns views: W1 | b1 | W2 | b2 in that order."""
    # Given a zero vector
    shape = Shape(4, 3, 2)
    theta = np.zeros(shape.size)
    # When each block is written through its view
    p = unpack(theta, shape)
    p.W1[...] = 1.0
    p.b1[...] = 2.0
    p.W2[...] = 3.0
    p.b2[...] = 4.0
    # Then the flat vector holds them in layout order
    assert shape.size == 3 * 4 + 3 + 2 * 3 + 2
    assert theta.tolist() == [1.0] * 12 + [2.0] * 3 + [3.0] * 6 + [4.0] * 2


# -- the per-event kernel -------------------------------------------------------------------------


def reference_steps(theta, shape, X, T, lr, clip):
    """``loss_and_grad`` + ``clip_by_norm`` + ``sgd_update``, one example at a time."""
    losses, norms = [], []
    for x, t in zip(X, T, strict=True):
        loss, grad = loss_and_grad(theta, shape, x[None, :], t[None, :])
        norms.append(float(np.linalg.norm(grad)))
        theta = sgd_update(theta, clip_by_norm(grad, clip), lr)
        losses.append(float(loss[0]))
    return theta, losses, norms


@pytest.mark.parametrize("clip", [0.0, 0.05, 10.0])
@pytest.mark.parametrize("dims", [(4, 6, 1), (4, 5, 3)], ids=["K=1", "K=3"])
def test_per_event_kernel_equals_reference(dims, clip) -> None:
    """``PerEventSGD.step`` is the same arithmetic as the pure functions, step after step."""
    # Given a problem of 12 examples
    shape, theta, X, T = problem(*dims, batch=12, seed=7)
    lr = 0.3
    expected, expected_losses, norms = reference_steps(theta.copy(), shape, X, T, lr, clip)
    # When the kernel trains on them one after the other
    kernel = PerEventSGD(shape, lr, clip, theta.copy())
    losses = [kernel.step(x, t.tolist()) for x, t in zip(X, T, strict=True)]
    # Then losses and weights match the reference
    np.testing.assert_allclose(losses, expected_losses, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(kernel.theta, expected, rtol=1e-12, atol=1e-14)
    # And the case under test really clipped (or really did not)
    if clip == 0.05:
        assert any(n > clip for n in norms)
    if clip == 10.0:
        assert all(n < clip for n in norms)


def test_per_event_kernel_updates_the_given_array_in_place() -> None:
    """The kernel writes the weights it was given (the trainer relies on it)."""
    # Given a weight vector
    shape, theta, X, T = problem(4, 4, 1, 1)
    before = theta.copy()
    # When the kernel steps on it
    kernel = PerEventSGD(shape, 0.1, 1.0, theta)
    kernel.step(X[0], T[0].tolist())
    # Then the same array holds the new weights
    assert kernel.theta is theta
    assert not np.array_equal(theta, before)


def test_per_event_loss_is_computed_before_the_update() -> None:
    """``step`` returns the loss of the prediction made before its update."""
    # Given weights and one example
    shape, theta, X, T = problem(4, 8, 2, 1, seed=11)
    x, t = X[0], T[0]
    before = float(bce_with_logits(forward(theta, shape, x[None])[1], t[None])[0])
    # When the kernel steps
    kernel = PerEventSGD(shape, 0.5, 0.0, theta.copy())
    loss = kernel.step(x, t.tolist())
    after = float(bce_with_logits(forward(kernel.theta, shape, x[None])[1], t[None])[0])
    # Then the returned loss is the one before the update, and the update reduced it
    assert loss == pytest.approx(before, rel=1e-12)
    assert after < before


def test_learning_one_at_a_time_equals_learning_the_list() -> None:
    """One kernel over a list equals a fresh kernel per event, passing the weights along."""
    # Given 20 examples
    shape, theta, X, T = problem(4, 6, 2, 20, seed=5)
    # When one kernel runs over all of them
    whole = PerEventSGD(shape, 0.2, 0.5, theta.copy())
    whole_losses = [whole.step(x, t.tolist()) for x, t in zip(X, T, strict=True)]
    # And, separately, each event gets its own kernel on the weights the previous one left
    current = theta.copy()
    single_losses = []
    for x, t in zip(X, T, strict=True):
        k = PerEventSGD(shape, 0.2, 0.5, current.copy())
        single_losses.append(k.step(x, t.tolist()))
        current = k.theta
    # Then weights and losses are bit-for-bit the same
    assert whole.theta.tobytes() == current.tobytes()
    assert whole_losses == single_losses


# -- clipping -------------------------------------------------------------------------------------


def test_clip_by_norm_bounds_the_norm() -> None:
    """Large gradients are scaled to the limit, small ones left alone, 0 disables."""
    # Given a gradient of norm 5
    g = np.array([3.0, 4.0])
    # Then clipping at 1 scales it to norm 1, same direction
    np.testing.assert_allclose(clip_by_norm(g.copy(), 1.0), [0.6, 0.8])
    # And clipping at 10 or at 0 leaves it alone
    assert clip_by_norm(g.copy(), 10.0).tolist() == [3.0, 4.0]
    assert clip_by_norm(g.copy(), 0.0).tolist() == [3.0, 4.0]


@pytest.mark.parametrize("kernel", ["per_event", "minibatch"])
def test_clipping_bounds_the_update_norm(kernel) -> None:
    """With clipping, one step moves the weights by at most lr * clip."""
    # Given a problem whose gradient is larger than the clip
    shape, theta, X, T = problem(4, 8, 3, 4, seed=2)
    T = 1.0 - np.round(T)  # confident wrong targets: a large gradient
    lr, clip = 0.7, 1e-3
    assert np.linalg.norm(loss_and_grad(theta, shape, X[:1], T[:1])[1]) > clip
    # When one step is taken
    if kernel == "per_event":
        k = PerEventSGD(shape, lr, clip, theta.copy())
        k.step(X[0], T[0].tolist())
        new = k.theta
    else:
        new, _ = minibatch_step(theta, shape, X, T, lr, clip)
    # Then the update's norm is exactly lr * clip (the gradient was clipped to the limit)
    moved = float(np.linalg.norm(new - theta))
    assert moved <= lr * clip * (1 + 1e-9)
    assert moved == pytest.approx(lr * clip, rel=1e-6)


# -- refusing non-finite updates ------------------------------------------------------------------


def one_step(kernel, shape, theta, X, T, lr, clip) -> None:
    """One step of either kernel on ``theta`` (per_event: on the first example, in place)."""
    if kernel == "per_event":
        PerEventSGD(shape, lr, clip, theta).step(X[0], T[0].tolist())
    else:
        minibatch_step(theta, shape, X, T, lr, clip)


@pytest.mark.parametrize("kernel", ["per_event", "minibatch"])
def test_huge_learning_rate_is_refused_and_weights_unchanged(kernel) -> None:
    """An update with lr=1e308 raises NonFiniteUpdateError and leaves the weights as they were."""
    # Given weights and a batch
    shape, theta, X, T = problem(4, 8, 2, 3, seed=4)
    before = theta.tobytes()
    # When a step with an absurd learning rate is attempted
    with pytest.raises(NonFiniteUpdateError) as info:
        one_step(kernel, shape, theta, X, T, 1e308, 1.0)
    # Then it is refused with the project's error and the weights are untouched
    assert isinstance(info.value, ItrainError)
    assert "learning rate" in str(info.value) or "non-finite" in str(info.value)
    assert theta.tobytes() == before


@pytest.mark.parametrize("kernel", ["per_event", "minibatch"])
def test_non_finite_input_is_refused_and_weights_unchanged(kernel) -> None:
    """A NaN reaching the kernel makes a non-finite logit: refused, weights untouched."""
    # Given weights and an input holding a NaN
    shape, theta, X, T = problem(4, 5, 1, 2, seed=6)
    X[0, 2] = np.nan
    before = theta.tobytes()
    # When a step is attempted
    with pytest.raises(NonFiniteUpdateError):
        one_step(kernel, shape, theta, X, T, 0.1, 1.0)
    # Then the weights are untouched
    assert theta.tobytes() == before


def test_sgd_update_refuses_non_finite_result() -> None:
    """``sgd_update`` never returns a vector with NaN or inf, and does not write its input."""
    # Given weights and a gradient holding an infinity
    theta = np.ones(5)
    grad = np.array([0.0, 1.0, np.inf, 0.0, 0.0])
    # When the update is computed
    with pytest.raises(NonFiniteUpdateError):
        sgd_update(theta, grad, 0.1)
    # Then the weights are untouched
    assert theta.tolist() == [1.0] * 5


# -- mini-batch -----------------------------------------------------------------------------------


def test_minibatch_step_returns_pre_update_losses_and_mean_gradient_update() -> None:
    """One mini-batch step: per-example losses before the update, theta - lr * clip(mean grad)."""
    # Given a batch
    shape, theta, X, T = problem(4, 7, 2, 6, seed=9)
    before = theta.tobytes()
    lr, clip = 0.4, 0.5
    pre = bce_with_logits(forward(theta, shape, X)[1], T)
    per_example = [loss_and_grad(theta, shape, X[i : i + 1], T[i : i + 1])[1] for i in range(6)]
    mean_grad = np.mean(per_example, axis=0)
    # When one mini-batch step is taken
    P = np.full((6, 2), np.nan)
    new, losses = minibatch_step(theta, shape, X, T, lr, clip, P)
    # Then the losses and predictions are the per-example pre-update ones
    assert losses.shape == (6,)
    np.testing.assert_allclose(losses, pre, rtol=1e-12)
    np.testing.assert_allclose(P, sigmoid(forward(theta, shape, X)[1]), rtol=0, atol=1e-15)
    # And the new weights are one clipped mean-gradient step
    np.testing.assert_allclose(new, theta - lr * clip_by_norm(mean_grad.copy(), clip), rtol=1e-12, atol=1e-15)
    # And the input weights are untouched
    assert theta.tobytes() == before


def test_minibatch_of_one_equals_per_event_step() -> None:
    """On a batch of one example the two modes take the same step."""
    # Given one example
    shape, theta, X, T = problem(4, 6, 3, 1, seed=12)
    # When each mode takes a step
    new, losses = minibatch_step(theta, shape, X, T, 0.25, 0.3)
    k = PerEventSGD(shape, 0.25, 0.3, theta.copy())
    loss = k.step(X[0], T[0].tolist())
    # Then they agree
    np.testing.assert_allclose(k.theta, new, rtol=1e-12, atol=1e-15)
    assert loss == pytest.approx(float(losses[0]), rel=1e-12)


# -- initialisation -------------------------------------------------------------------------------


def test_init_params_is_seeded() -> None:
    """Same seed, same bytes; another seed, other weights."""
    # Given a shape
    shape = Shape(4, 16, 2)
    # When weights are made from seeds
    a, b, c = init_params(shape, 42), init_params(shape, 42), init_params(shape, 43)
    # Then the seed decides them
    assert a.tobytes() == b.tobytes()
    assert a.tobytes() != c.tobytes()


@pytest.mark.parametrize("dims", [(4, 1, 1), (4, 16, 1), (4, 64, 8)])
def test_init_params_is_finite_glorot_with_zero_biases(dims) -> None:
    """Finite Glorot-uniform weights within the limit, zero biases, float64 of the right size."""
    # Given a shape
    shape = Shape(*dims)
    # When weights are initialised
    theta = init_params(shape, 0)
    p = unpack(theta, shape)
    # Then they have the right size and type, are finite, bounded and biases are zero
    assert theta.dtype == np.float64
    assert theta.shape == (shape.size,)
    assert np.isfinite(theta).all()
    for w in (p.W1, p.W2):
        limit = np.sqrt(6.0 / sum(w.shape))
        assert np.abs(w).max() <= limit
        assert np.abs(w).max() > 0
    assert not p.b1.any()
    assert not p.b2.any()
