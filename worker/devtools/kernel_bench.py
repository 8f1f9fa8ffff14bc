"""``python -m worker.devtools.kernel_bench``: the per-event SGD step alone, compiled against numpy.

CPU µs per event of ``kernel.per_event_steps`` (numba) and ``kernel.per_event_steps_reference``
(numpy, ``PerEventSGD``) on the same batches, the largest weight difference between them, and
the cost of getting the compiled kernel in a fresh process: compiling it into an empty cache,
then loading it from that cache.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence

import numpy as np

from worker.engine.kernel import per_event_steps, per_event_steps_reference, warm_up
from worker.engine.mlp import Shape, init_params

__all__ = ["main", "measure"]

_COLD = "import time; t = time.perf_counter(); from worker.engine.kernel import warm_up; warm_up(); " + (
    "print(time.perf_counter() - t)"
)


def measure(shape: Shape, batch: int, repeats: int, seed: int = 0) -> dict[str, float]:
    """Best-of-``repeats`` process CPU time per event for each kernel on one batch."""
    rng = np.random.default_rng(seed)
    theta = init_params(shape, seed)
    X = rng.uniform(-1.0, 1.0, (batch, shape.inputs))
    T = rng.uniform(0.0, 1.0, (batch, shape.outputs))
    warm_up()

    def best(kernel: Callable[..., object]) -> float:
        times = []
        for _ in range(repeats):
            th = theta.copy()
            start = time.process_time()
            kernel(th, shape, X, T, 0.05, 1.0)
            times.append(time.process_time() - start)
        return min(times) / batch * 1e6

    fast, ref = theta.copy(), theta.copy()
    per_event_steps(fast, shape, X, T, 0.05, 1.0)
    per_event_steps_reference(ref, shape, X, T, 0.05, 1.0)
    return {
        "numba_us_per_event": best(per_event_steps),
        "numpy_us_per_event": best(per_event_steps_reference),
        "max_weight_difference": float(np.abs(fast - ref).max()),
    }


def _startup() -> dict[str, float]:
    """Seconds to import and warm up the kernel in a new process: empty cache, then filled."""
    with tempfile.TemporaryDirectory() as cache:
        env = {**os.environ, "NUMBA_CACHE_DIR": cache}
        runs = [
            subprocess.run([sys.executable, "-c", _COLD], env=env, capture_output=True, text=True, check=True)
            for _ in range(2)
        ]
    # Both include importing numpy and numba.
    compiled, loaded = (float(r.stdout) for r in runs)
    return {"import_and_compile_s": compiled, "import_and_load_from_cache_s": loaded}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m worker.devtools.kernel_bench", description=__doc__)
    parser.add_argument("--hidden", type=int, default=16)
    parser.add_argument("--outputs", type=int, default=1)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=200)
    args = parser.parse_args(argv)
    shape = Shape(4, args.hidden, args.outputs)
    figures = {"shape": f"4-{args.hidden}-{args.outputs}", "batch": args.batch}
    figures.update(measure(shape, args.batch, args.repeats))
    figures.update(_startup())
    print(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
