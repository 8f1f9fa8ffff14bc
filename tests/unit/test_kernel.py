"""The compiled per-event SGD kernel (``worker.engine.kernel``) against the numpy reference:
same weights and losses, same refusals, one compiled signature."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from producer.errors import NonFiniteUpdateError
from tests.helpers import problem
from worker.engine.kernel import per_event_steps, per_event_steps_reference

TOL = 1e-12
ROOT = Path(__file__).resolve().parents[2]


def both(shape, theta, X, T, lr, clip):
    """Weights and per-event results of each kernel, each from its own copy of ``theta``; the
    predictions each made before every update are checked equal on the way."""
    fast, ref = theta.copy(), theta.copy()
    fast_p, ref_p = np.full((len(X), shape.outputs), np.nan), np.full((len(X), shape.outputs), np.nan)
    fast_out = per_event_steps(fast, shape, X, T, lr, clip, fast_p)
    with np.errstate(over="ignore", invalid="ignore"):  # numpy warns where the compiled loop is silent
        ref_out = per_event_steps_reference(ref, shape, X, T, lr, clip, ref_p)
    scored = [k for k, out in enumerate(ref_out) if not isinstance(out, NonFiniteUpdateError)]
    np.testing.assert_allclose(fast_p[scored], ref_p[scored], rtol=0, atol=TOL)
    assert np.all((fast_p[scored] >= 0) & (fast_p[scored] <= 1))
    return fast, fast_out, ref, ref_out


def assert_same(fast, fast_out, ref, ref_out) -> None:
    """Equal weights and losses within 1e-12, and the same events refused with the same message."""
    np.testing.assert_allclose(fast, ref, rtol=0, atol=TOL)
    assert len(fast_out) == len(ref_out)
    for a, b in zip(fast_out, ref_out, strict=True):
        if isinstance(b, NonFiniteUpdateError):
            assert isinstance(a, NonFiniteUpdateError)
            assert str(a) == str(b)
        else:
            assert isinstance(a, float)
            assert a == pytest.approx(b, rel=0, abs=TOL)


# -- equal to the numpy kernel ----------------------------------------------------------------------


def test_predictions_are_the_sigmoid_of_the_weights_before_each_update() -> None:
    """Test-then-train: row k's prediction comes from the weights after rows 0..k-1 only."""
    from worker.engine.mlp import forward, sigmoid

    shape, theta, X, T = problem(4, 8, 2, 6, 3)
    P = np.empty((6, 2))
    w = theta.copy()
    per_event_steps(w, shape, X, T, 0.3, 1.0, P)
    replay = theta.copy()
    for k in range(6):
        np.testing.assert_allclose(
            P[k], sigmoid(forward(replay, shape, X[k : k + 1])[1])[0], rtol=0, atol=TOL
        )
        per_event_steps(replay, shape, X[k : k + 1], T[k : k + 1], 0.3, 1.0)
    with pytest.raises(ValueError, match="predictions"):
        per_event_steps(theta.copy(), shape, X, T, 0.3, 1.0, np.empty((6, 3)))


@pytest.mark.parametrize("seed", range(40))
def test_random_shapes_and_batches_equal_the_numpy_kernel(seed: int) -> None:
    """Hidden 1..64, outputs 1..4, any batch size, learning rate and clip: same weights and losses."""
    # Given a random network, batch and hyper-parameters
    rng = np.random.default_rng(1000 + seed)
    hidden, outputs = int(rng.integers(1, 65)), int(rng.integers(1, 5))
    inputs, batch = int(rng.choice([4, 1, 7])), int(rng.integers(1, 200))
    lr = float(10 ** rng.uniform(-3, 0))
    clip = float(rng.choice([0.0, 0.01, 1.0, 100.0]))
    shape, theta, X, T = problem(inputs, hidden, outputs, batch, seed)
    # When each kernel trains on the batch
    fast, fast_out, ref, ref_out = both(shape, theta, X, T, lr, clip)
    # Then they agree, and the weights moved
    assert_same(fast, fast_out, ref, ref_out)
    assert all(isinstance(x, float) for x in fast_out)
    assert not np.array_equal(fast, theta)


@pytest.mark.parametrize(("hidden", "outputs"), [(1, 1), (1, 4), (64, 1), (64, 4), (16, 1), (1023, 9)])
@pytest.mark.parametrize("clip", [0.0, 0.05, 10.0])
def test_edge_shapes_equal_the_numpy_kernel(hidden: int, outputs: int, clip: float) -> None:
    """The smallest and largest shapes (and a wide one), with clipping off, always on and never
    reached."""
    # Given 256 events on a 4-hidden-outputs network
    shape, theta, X, T = problem(4, hidden, outputs, 256, seed=hidden * 10 + outputs)
    # When each kernel trains on them
    fast, fast_out, ref, ref_out = both(shape, theta, X, T, 0.3, clip)
    # Then they agree
    assert_same(fast, fast_out, ref, ref_out)


def test_updates_the_given_array_in_place() -> None:
    """The weights passed in are the weights written (the trainer relies on it)."""
    shape, theta, X, T = problem(4, 5, 2, 3, seed=1)
    before = theta.copy()
    per_event_steps(theta, shape, X, T, 0.1, 1.0)
    assert not np.array_equal(theta, before)


# -- refusals ---------------------------------------------------------------------------------------


def test_a_refused_event_fails_alone_and_the_next_continue_from_the_weights_before_it() -> None:
    """A NaN input (non-finite logit) and an infinite input (non-finite gradient) mid-batch: those
    two events are refused with the numpy kernel's messages; the rest train as if they were absent."""
    # Given a batch whose events 3 and 7 cannot be trained
    shape, theta, X, T = problem(4, 8, 2, 12, seed=5)
    X[3, 1] = np.nan
    X[7, 0] = np.inf
    # When each kernel trains on it
    fast, fast_out, ref, ref_out = both(shape, theta, X, T, 0.2, 1.0)
    # Then both refuse exactly those two, with the same reasons
    assert_same(fast, fast_out, ref, ref_out)
    refused = [i for i, x in enumerate(fast_out) if isinstance(x, NonFiniteUpdateError)]
    assert refused == [3, 7]
    assert str(fast_out[3]) == "non-finite logit (nan)"
    assert str(fast_out[7]) == "non-finite gradient"
    # And the other events left the same weights as a batch without those two
    keep = [i for i in range(12) if i not in refused]
    alone = theta.copy()
    losses = per_event_steps(alone, shape, X[keep], T[keep], 0.2, 1.0)
    np.testing.assert_allclose(fast, alone, rtol=0, atol=TOL)
    assert [fast_out[i] for i in keep] == pytest.approx(losses, rel=0, abs=TOL)


def test_huge_learning_rate_refuses_every_event_and_leaves_the_weights_unchanged() -> None:
    """lr=1e308: every update is refused, with the numpy kernel's message, and no weight changes."""
    # Given weights and a batch
    shape, theta, X, T = problem(4, 8, 2, 5, seed=4)
    before = theta.tobytes()
    # When trained with an absurd learning rate
    fast, fast_out, ref, ref_out = both(shape, theta, X, T, 1e308, 0.0)
    # Then every event is refused and the weights are bit-for-bit the same
    assert_same(fast, fast_out, ref, ref_out)
    assert all(isinstance(x, NonFiniteUpdateError) for x in fast_out)
    assert "learning rate 1e+308" in str(fast_out[0])
    assert fast.tobytes() == before


def test_weights_that_would_overflow_are_refused() -> None:
    """Weights near the float limit: an update whose result overflows is refused, weights untouched."""
    # Given a bias so large that any step makes the squared norm overflow
    shape, theta, X, T = problem(4, 3, 1, 2, seed=8)
    theta[-1] = 1e200
    # When each kernel trains
    fast, fast_out, ref, ref_out = both(shape, theta, X, T, 0.1, 1.0)
    # Then both refuse, and nothing was written
    assert_same(fast, fast_out, ref, ref_out)
    assert all(isinstance(x, NonFiniteUpdateError) for x in fast_out)
    assert fast.tobytes() == theta.tobytes()


def test_bad_arguments_are_named() -> None:
    """Mismatched shapes or read-only weights: a clear ValueError, nothing trained."""
    shape, theta, X, T = problem(4, 3, 1, 2, seed=0)
    with pytest.raises(ValueError, match="shapes do not match"):
        per_event_steps(theta, shape, X[:, :3], T, 0.1, 1.0)
    with pytest.raises(ValueError, match="shapes do not match"):
        per_event_steps(theta, shape, X, T[:1], 0.1, 1.0)
    frozen = theta.copy()
    frozen.flags.writeable = False
    with pytest.raises(ValueError, match="writable"):
        per_event_steps(frozen, shape, X, T, 0.1, 1.0)


# -- compiled once, before the pool forks -----------------------------------------------------------


def test_worker_init_compiles_the_one_signature_the_trainer_uses(tmp_path) -> None:
    """Celery's ``worker_init`` (main process, before the pool forks) compiles the kernel; the
    trainer's ``step`` afterwards, in a forked child, needs no other signature and compiles nothing."""
    script = textwrap.dedent(
        """
        import os, sys
        from celery.signals import worker_init
        import worker.consume.app  # connects the handler, as `celery -A worker worker` does
        from worker.engine import kernel
        assert kernel._compiled.signatures == [], "compiled at import"
        worker_init.send(sender=None)
        assert len(kernel._compiled.signatures) == 1, kernel._compiled.signatures
        from tests.helpers import problem, make_events
        from tests.unit.test_batch import _batch
        from worker.engine.batch import step
        pid = os.fork()
        if pid == 0:
            batch = _batch(make_events("m", 50, "fork", labels=True), hidden=7, lr=0.1)
            step(batch)
            ok = len(batch.trained) == 50 and len(kernel._compiled.signatures) == 1
            os._exit(0 if ok else 3)
        _, status = os.waitpid(pid, 0)
        sys.exit(os.waitstatus_to_exitcode(status))
        """
    )
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path / "numba")}
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    # And the kernel was cached where NUMBA_CACHE_DIR says
    assert any(p.suffix == ".nbc" for p in (tmp_path / "numba").rglob("*"))
