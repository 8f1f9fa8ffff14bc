"""The ``itrain`` console script. It loads the command line only once the ``[worker]`` extra
(numpy, numba, rich, flower) is known to be installed: a publishing-only install gets one line
saying what to install, not a traceback."""

from __future__ import annotations

import sys
from collections.abc import Sequence

__all__ = ["WORKER_EXTRA", "main"]

#: The top-level modules the ``[worker]`` extra brings (pyproject.toml).
WORKER_EXTRA = ("numpy", "numba", "rich", "flower")
_INSTALL = "pip install 'interaction-trainer[worker]'"


def main(argv: Sequence[str] | None = None) -> int:
    try:
        from worker.cli import main as cli_main
    except ModuleNotFoundError as exc:
        if (exc.name or "").split(".")[0] not in WORKER_EXTRA:
            raise
        missing = f"no module {exc.name!r}"
        print(f"itrain: the worker side is not installed ({missing}); run: {_INSTALL}", file=sys.stderr)
        return 1
    return cli_main(argv)
