"""``itrain export`` / ``itrain import``: a model to a portable ``.npz`` and back, against a real
Redis; corrupt, truncated and mismatched files refused with the model untouched."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import orjson
import pytest

from producer.errors import CheckpointError, ModelExistsError
from producer.events import InteractionData
from producer.keys import ModelKeys
from tests.helpers import predictions, raw_event
from tests.integration.test_cli import cli, one_line
from tests.integration.test_run_messages import own_runtime, step_message
from worker.consume.runtime import run_messages
from worker.ops.portable import export_model, import_model, read_export

__all__ = ["cli", "own_runtime"]  # fixtures, imported for the tests below

PROBES = [InteractionData(user_id=f"probe-{i}", action_type="click", timestamp=i * 977) for i in range(8)]


@pytest.fixture
def trained(own_runtime, make_model) -> str:
    model = make_model()
    run_messages([step_message(f"{model}-{i}", raw_event(model, f"e{i}")) for i in range(40)])
    return model


def test_round_trip_gives_identical_predictions(own_runtime, trained, tmp_path: Path) -> None:
    store, trainer = own_runtime.store, own_runtime.trainer
    # Given a trained model exported
    out = tmp_path / "m.npz"
    header = export_model(store, trained, out, {"click": 1.0})
    assert (header.step, header.layers.hidden, header.config.mode) == (40, 16, "per_event")
    # When it is imported under another name
    copy = f"{trained}-copy"
    name, version, _ = import_model(store, out, copy, force=False)
    # Then that model predicts exactly as the original, at its step, as version 1 of its own
    assert (name, version) == (copy, 1)
    assert predictions(trainer, copy, PROBES) == predictions(trainer, trained, PROBES)
    assert store.load(copy).step == 40


def test_import_over_a_model_needs_force_and_moves_the_version_forward(
    own_runtime, trained, make_model, tmp_path: Path
) -> None:
    store = own_runtime.store
    out = tmp_path / "m.npz"
    export_model(store, trained, out, {})
    other = make_model()
    before = store.load(other).version
    with pytest.raises(ModelExistsError):
        import_model(store, out, other, force=False)
    assert store.load(other).version == before
    _, version, _ = import_model(store, out, other, force=True)
    assert version == before + 1
    assert own_runtime.trainer.predict(PROBES[0].model_copy(update={"model": other}))["version"] == version


def _rewrite(src: Path, dst: Path, **changes) -> None:
    with np.load(src, allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    header = orjson.loads(str(arrays["header"]))
    for key, value in changes.pop("header", {}).items():
        header[key] = value
    arrays["header"] = np.array(orjson.dumps(header).decode())
    arrays.update(changes)
    with dst.open("wb") as f:
        np.savez(f, **arrays)


@pytest.mark.parametrize(
    ("damage", "says"),
    [
        ("truncated", "not a readable export"),
        ("garbage", "not a readable export"),
        ("pickle", "not a readable export"),
        ("other-features", "other inputs"),
        ("short-weights", "needs 97 little-endian float64"),
        ("nan-weights", "non-finite"),
        ("bad-header", "header is not valid: config.lr"),
        ("newer-format", r"export format 2 is newer than this release reads \(format 1\)"),
        ("extra-array", "not an export's params and header"),
    ],
)
def test_damaged_file_is_refused_and_the_model_untouched(
    own_runtime, trained, tmp_path: Path, damage: str, says: str
) -> None:
    store = own_runtime.store
    good = tmp_path / "good.npz"
    export_model(store, trained, good, {})
    bad = tmp_path / "bad.npz"
    params = np.load(good, allow_pickle=False)["params"]
    if damage == "truncated":
        bad.write_bytes(good.read_bytes()[:-200])
    elif damage == "garbage":
        bad.write_bytes(b"\x00" * 500)
    elif damage == "pickle":
        buffer = io.BytesIO()
        np.savez(buffer, params=params, header=np.array([{"evil": 1}], dtype=object))
        bad.write_bytes(buffer.getvalue())
    elif damage == "other-features":
        _rewrite(good, bad, header={"features": {"inputs": ["something else"]}})
    elif damage == "short-weights":
        _rewrite(good, bad, params=params[:-1])
    elif damage == "nan-weights":
        _rewrite(good, bad, params=np.where(np.arange(params.size) == 3, np.nan, params))
    elif damage == "newer-format":
        _rewrite(good, bad, header={"format_version": 2})
    elif damage == "bad-header":
        _rewrite(good, bad, header={"config": {"lr": -1}})
    else:
        _rewrite(good, bad, extra=np.zeros(1))
    before = own_runtime.store.client.hgetall(ModelKeys(trained).ckpt)
    with pytest.raises(CheckpointError, match=says):
        import_model(store, bad, trained, force=True)
    assert own_runtime.store.client.hgetall(ModelKeys(trained).ckpt) == before


def test_cli_export_then_import_and_a_corrupt_file_exits_1(cli, capsys, trained, tmp_path: Path) -> None:
    out = tmp_path / "cli.npz"
    assert cli(["export", "--model", trained, "--out", str(out)]) == 0
    assert read_export(out)[0].model == trained
    assert cli(["import", str(out), "--model", f"{trained}-cli"]) == 0
    assert f"model {trained}-cli is now version 1" in capsys.readouterr().out
    broken = tmp_path / "broken.npz"
    broken.write_bytes(out.read_bytes()[:100])
    assert cli(["import", str(broken), "--model", f"{trained}-cli", "--force"]) == 1
    assert "not a readable export" in one_line(capsys.readouterr().err)
