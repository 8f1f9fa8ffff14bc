"""The packages' layering, read from the source's import statements (no import is run, so a
package's ``__init__`` pulling in more cannot hide or fake an edge).

- ``worker.engine`` is pure computation: neither it nor anything it imports (within ``worker`` and
  ``producer``) imports Redis, Celery or kombu, the store, the training loop or the consumer.
- ``worker.store`` does Redis I/O for the engine's types; it never imports the training loop or
  the consumer, so the engine never reaches I/O through it.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IO_LIBRARIES = ("redis", "celery", "kombu")
#: Modules the walk does not enter, each with the reason it is harmless to the engine.
NOT_FOLLOWED = {
    # The one settings object (the engine reads the user-id hash key from it) checks Redis URLs
    # with ``producer.redis_conn.check_tls_url``, a parse of the URL that opens no connection.
    "producer.redis_conn": "URL checks for producer.settings",
    # Likewise ``producer.sentinel.complete_url``: settings read a sentinel URL; clients of its
    # master are made only by ``connect()``.
    "producer.sentinel": "sentinel URL checks for producer.settings",
}
#: Imports of an I/O library that bring no I/O, each with its reason.
HARMLESS = {
    # ResultTimeoutError subclasses Celery's TimeoutError so that ``except`` clauses written for
    # Celery's handles catch ours: an exception class, nothing that connects.
    ("producer.errors", "celery.exceptions"): "an exception base class",
}


def module_path(name: str) -> Path | None:
    """The source file of a ``worker`` or ``producer`` module (its ``__init__`` for a package)."""
    base = ROOT.joinpath(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.exists():
            return path
    return None


def imports_of(name: str) -> set[str]:
    """Every module named by an import statement of ``name``'s source, at any depth of its body
    (imports inside functions count too)."""
    path = module_path(name)
    assert path is not None, name
    found: set[str] = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            found.add(base)
            # ``from worker.engine import mlp`` names the module worker.engine.mlp
            named = (f"{base}.{alias.name}" for alias in node.names)
            found.update(m for m in named if module_path(m))
    return found


def own(name: str) -> bool:
    return name.split(".")[0] in ("worker", "producer") and module_path(name) is not None


def closure(start: list[str]) -> dict[str, str]:
    """Every project module reached from ``start`` through import statements, each with the chain
    that reaches it (for the failure message). A package's ``__init__`` is not followed unless it
    is imported by name, as Python runs it but our modules do not depend on what it imports."""
    seen = {name: name for name in start}
    todo = list(start)
    while todo:
        name = todo.pop()
        for dep in imports_of(name):
            if own(dep) and dep not in seen and dep not in NOT_FOLLOWED:
                seen[dep] = f"{seen[name]} -> {dep}"
                todo.append(dep)
    return seen


def modules_of(package: str) -> list[str]:
    folder = ROOT.joinpath(*package.split("."))
    return sorted(f"{package}.{p.stem}" for p in folder.glob("*.py") if p.stem != "__init__")


def offences(package: str, forbidden_packages: tuple[str, ...]) -> list[str]:
    reached = closure(modules_of(package))
    out = []
    for name, chain in sorted(reached.items()):
        if name.startswith(forbidden_packages):
            out.append(chain)
        for dep in imports_of(name):
            if dep.split(".")[0] in IO_LIBRARIES and (name, dep) not in HARMLESS:
                out.append(f"{chain} imports {dep}")
    return out


def test_the_engine_imports_no_io() -> None:
    assert modules_of("worker.engine"), "no engine modules found"
    forbidden = ("worker.store", "worker.training", "worker.consume", "worker.ops", "worker.cli")
    assert offences("worker.engine", forbidden) == []


def test_the_store_never_imports_the_training_loop_or_the_consumer() -> None:
    reached = closure(modules_of("worker.store"))
    assert sorted(c for n, c in reached.items() if n.startswith(("worker.training", "worker.consume"))) == []


@pytest.mark.parametrize("module", ["worker.store.model_store", "worker.training.trainer"])
def test_the_check_sees_io_where_it_is(module: str) -> None:
    # The check itself reads imports right: the store and the training loop do talk to Redis
    reached = closure([module])
    assert any(dep.split(".")[0] == "redis" for name in reached for dep in imports_of(name))
