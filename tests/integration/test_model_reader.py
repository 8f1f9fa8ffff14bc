"""``producer.ModelReader``: in-process predictions from the shared checkpoint, equal to the
worker's, following new versions."""

from __future__ import annotations

import pytest

from producer.errors import ModelNotInitialisedError
from producer.events import InteractionData
from producer.features import Featurizer
from producer.model_reader import ModelReader
from producer.settings import Settings
from tests.helpers import raw_event
from tests.integration.test_run_messages import own_runtime, step_message
from worker.consume.runtime import run_messages
from worker.engine.features import featurize_many

__all__ = ["own_runtime"]  # the fixture, imported for the tests below

PROBES = [
    InteractionData(user_id=f"user-{i}", action_type=("click", "view", "like")[i % 3], timestamp=i * 7919.25,
                    context={"page": "home"} if i % 2 else None)
    for i in range(25)
]  # fmt: skip


def test_producer_features_are_the_workers(own_runtime) -> None:
    rows = [Featurizer().row(e) for e in PROBES]
    assert [list(r) for r in rows] == featurize_many(PROBES).tolist()
    keyed = Featurizer(b"k" * 32).row(PROBES[0])
    assert keyed[1::2] == rows[0][1::2]  # time of day and context: no hash
    assert keyed[0] != rows[0][0]
    assert keyed[2] != rows[0][2]


def test_predictions_equal_the_workers_and_follow_new_versions(own_runtime, make_model, redis_url) -> None:
    trainer = own_runtime.trainer
    model = make_model()
    run_messages([step_message(f"{model}-{i}", raw_event(model, f"r{i}")) for i in range(30)])
    with ModelReader(model, redis_url, refresh_ms=0) as reader:
        for event in PROBES:
            mine = reader.predict(event)
            theirs = trainer.predict(event.model_copy(update={"model": model}))
            assert mine["version"] == theirs["version"]
            assert mine["prediction"] == pytest.approx(theirs["prediction"], abs=1e-12, rel=0)
        first = reader.version
        # When the model trains on, the reader follows the new version at its next check
        run_messages([step_message(f"{model}-n{i}", raw_event(model, f"n{i}")) for i in range(5)])
        assert reader.version > first
        theirs = trainer.predict(PROBES[3].model_copy(update={"model": model}))
        mine = reader.predict(PROBES[3])["prediction"]
        assert mine == pytest.approx(theirs["prediction"], abs=1e-12, rel=0)


def test_reader_checks_for_a_new_version_at_most_every_refresh_ms(own_runtime, make_model, redis_url) -> None:
    model = make_model()
    with ModelReader(model, redis_url, refresh_ms=60_000) as reader:
        before = reader.version
        run_messages([step_message(f"{model}-x", raw_event(model, "x"))])
        assert reader.version == before  # within the minute: the cached weights, no round trip
    with ModelReader(model, redis_url) as fresh:
        assert fresh.version > before


def test_missing_model_is_named(redis_url) -> None:
    with (
        ModelReader("no-such-model", redis_url, settings=Settings(redis_url=redis_url)) as reader,
        pytest.raises(ModelNotInitialisedError, match="no-such-model"),
    ):
        reader.predict(PROBES[0])
