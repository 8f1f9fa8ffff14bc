"""Lua scripts kept as ``.lua`` files beside the modules that run them.

Each file starts with a header naming its KEYS and ARGV. ``load_lua`` reads one once per process;
``register_script`` then only hashes it, and redis-py's ``Script`` falls back from ``EVALSHA`` to
``EVAL`` when a restarted Redis has forgotten it (``NOSCRIPT``).
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

__all__ = ["load_lua"]


@cache
def load_lua(package: str, name: str) -> str:
    """The text of ``<package>/lua/<name>.lua``, e.g. ``load_lua("worker.store", "commit")``."""
    return (files(package) / "lua" / f"{name}.lua").read_text(encoding="utf-8")
