"""The checked-in JSON Schema of the event stays in sync with the code and with ``itrain schema``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from producer.events import event_json_schema
from producer.settings import get_settings
from worker.cli import main

ROOT = Path(__file__).resolve().parents[2]
SCHEMA_FILE = ROOT / "producer" / "schema" / "interaction_data.schema.json"
REGENERATE = "itrain schema > producer/schema/interaction_data.schema.json"


@pytest.fixture
def fresh_settings():
    """``main`` reads the lru_cached settings: read them anew, and forget them afterwards."""
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


def test_checked_in_schema_matches_the_code() -> None:
    """``producer/schema/interaction_data.schema.json`` is ``event_json_schema()``."""
    # Given the schema file in the repository
    checked_in = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    # When compared with the schema the code produces
    current = json.loads(json.dumps(event_json_schema()))
    # Then they are the same
    assert checked_in == current, f"the schema file is out of date; regenerate it with `{REGENERATE}`"


def test_itrain_schema_prints_the_checked_in_schema(capsys, fresh_settings) -> None:
    """``itrain schema`` prints exactly the schema kept in the repository."""
    # Given the schema file
    checked_in = json.loads(SCHEMA_FILE.read_text(encoding="utf-8"))
    # When `itrain schema` runs
    code = main(["schema"])
    printed = capsys.readouterr().out
    # Then it succeeds and prints the same JSON Schema
    assert code == 0
    assert json.loads(printed) == checked_in, (
        f"`itrain schema` differs from the schema file; regenerate it with `{REGENERATE}`"
    )
    assert json.loads(printed) == json.loads(json.dumps(event_json_schema()))


def test_schema_states_the_contract() -> None:
    """The schema itself carries the contract's main rules (closed object, required fields)."""
    # Given the schema
    schema = event_json_schema()
    # Then unknown fields are rejected and only who, what and when are required
    assert schema["type"] == "object"
    assert schema["additionalProperties"] is False
    assert sorted(schema["required"]) == ["action_type", "timestamp", "user_id"]
    assert set(schema["properties"]) == {
        "event_id",
        "user_id",
        "action_type",
        "timestamp",
        "context",
        "label",
        "model",
    }
    assert schema["properties"]["model"]["default"] == "default"
    assert schema["properties"]["user_id"]["maxLength"] == 256
    assert schema["properties"]["action_type"]["maxLength"] == 64
    assert schema["properties"]["event_id"]["maxLength"] == 128
