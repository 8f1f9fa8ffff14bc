"""Compiling the engine's hot loops with numba, cached on disk.

Compiled on first call and cached (``NUMBA_CACHE_DIR``, else ``__pycache__`` beside the module or
the user's cache directory). The worker's main process compiles them (``kernel.warm_up``) before
the pool forks, so pool processes inherit the machine code and never compile.
"""

from __future__ import annotations

import logging
from typing import Any

import numba

__all__ = ["compile_cached"]

logger = logging.getLogger("itrain.kernel")


def compile_cached(func: Any) -> Any:
    """``func`` compiled in nopython mode, cached on disk when a cache directory is writable."""
    try:
        return numba.njit(cache=True)(func)
    except RuntimeError as exc:  # no writable cache directory: compile in memory on every start
        logger.warning("numba cannot cache %s (%s); set NUMBA_CACHE_DIR to a writable directory", func, exc)
        return numba.njit(cache=False)(func)
