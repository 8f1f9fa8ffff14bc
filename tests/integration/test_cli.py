"""The ``itrain`` command line: init, stats, and its behaviour on bad input or an unreachable Redis.

In-process tests call ``worker.cli.main`` against the private Redis of the session (conftest sets
``ITRAIN_REDIS_URL``); the settings are lru_cached, so they are cleared before and after each test.
Subprocess tests run the installed ``itrain`` script with an explicit environment.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import redis

from producer.keys import ModelKeys
from producer.settings import get_settings
from worker.cli import main
from worker.devtools.embedded_redis import RedisServer
from worker.engine.mlp import Shape, init_params

ITRAIN = str(Path(sys.executable).with_name("itrain"))
UNREACHABLE = "redis://127.0.0.1:1/0"
CONTRACT_KEYS = {
    "model",
    "initialized",
    "version",
    "step",
    "interactions",
    "interactions_by_action",
    "loss_last",
    "loss_ema",
    "history_len",
    "failures",
    "dead_letters",
    "redis_memory_used",
    "eval",
}


@pytest.fixture
def cli(redis_url):
    """``main`` against the private Redis, with settings read afresh (and forgotten afterwards)."""
    assert os.environ["ITRAIN_REDIS_URL"] == redis_url
    get_settings.cache_clear()
    yield main
    get_settings.cache_clear()


def ckpt_key(model: str) -> str:
    return f"itrain:{{{model}}}:ckpt"


def one_line(text: str) -> str:
    """The single non-empty line of ``text`` (fails if there are more or none)."""
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one line, got {len(lines)}: {text!r}"
    return lines[0]


def stats_json(cli, capsys, model: str) -> dict:
    capsys.readouterr()
    assert cli(["stats", "--model", model, "--json"]) == 0
    out = capsys.readouterr().out
    return json.loads(one_line(out))


def run_itrain(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [ITRAIN, *args], env={**os.environ, **env}, capture_output=True, text=True, timeout=60
    )


# -- init -----------------------------------------------------------------------------------------


def test_init_creates_model(cli, capsys, redis_client, model_name) -> None:
    """`itrain init` writes a fresh checkpoint: initialised, version 1, step 0, seeded weights."""
    # When a model is initialised
    code = cli(["init", "--model", model_name, "--hidden", "5", "--outputs", "2", "--seed", "7"])
    # Then it succeeds and says so
    assert code == 0
    assert model_name in capsys.readouterr().out
    # And the stats show a fresh model
    stats = stats_json(cli, capsys, model_name)
    assert stats["initialized"] is True
    assert stats["version"] == 1
    assert stats["step"] == 0
    # And the checkpoint holds the seeded weights of that shape
    params = redis_client.hget(ckpt_key(model_name), "params")
    assert params == init_params(Shape(4, 5, 2), 7).astype("<f8").tobytes()


def test_init_again_without_force_refuses(cli, capsys, redis_client, model_name) -> None:
    """A second `init` without --force exits non-zero with one line and changes nothing."""
    # Given an initialised model
    assert cli(["init", "--model", model_name, "--seed", "1"]) == 0
    before = redis_client.hgetall(ckpt_key(model_name))
    capsys.readouterr()
    # When it is initialised again, with another seed, without --force
    code = cli(["init", "--model", model_name, "--seed", "2"])
    captured = capsys.readouterr()
    # Then the command fails with a one-line error naming the model and the way out
    assert code != 0
    line = one_line(captured.err)
    assert model_name in line
    assert "--force" in line
    assert "Traceback" not in captured.err
    # And the checkpoint is unchanged, weights and version alike
    after = redis_client.hgetall(ckpt_key(model_name))
    assert after[b"params"] == before[b"params"]
    assert after == before
    assert stats_json(cli, capsys, model_name)["version"] == 1


def test_init_force_replaces_model_and_version_rises(cli, capsys, redis_client, model_name) -> None:
    """`init --force` replaces the weights and the version keeps rising."""
    # Given an initialised model
    assert cli(["init", "--model", model_name, "--seed", "1"]) == 0
    old = redis_client.hget(ckpt_key(model_name), "params")
    # When it is replaced with another seed
    code = cli(["init", "--model", model_name, "--seed", "2", "--force"])
    # Then the weights are the new seed's, the version rose and the step starts again
    assert code == 0
    new = redis_client.hget(ckpt_key(model_name), "params")
    assert new != old
    assert new == init_params(Shape(4, 16, 1), 2).astype("<f8").tobytes()
    stats = stats_json(cli, capsys, model_name)
    assert stats["version"] == 2
    assert stats["step"] == 0


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--clip", "-1"], "clip"),
        (["--hidden", "5000"], "hidden"),
        (["--lr", "inf"], "lr"),
        (["--outputs", "65"], "outputs"),
    ],
)
def test_init_with_invalid_config_fails_cleanly(cli, capsys, redis_client, model_name, args, field) -> None:
    """A hyper-parameter out of range: non-zero exit, one line naming it, no model written."""
    # When init gets an out-of-range value
    code = cli(["init", "--model", model_name, *args])
    captured = capsys.readouterr()
    # Then it fails with one line naming the parameter
    assert code != 0
    assert field in one_line(captured.err)
    assert "Traceback" not in captured.err
    # And nothing was written
    assert not redis_client.exists(ckpt_key(model_name))


@pytest.mark.parametrize(
    "args",
    [["--hidden", "0"], ["--hidden", "abc"], ["--outputs", "0"], ["--lr", "0"], ["--mode", "bogus"]],
)
def test_init_with_bad_argument_exits_non_zero(cli, capsys, redis_client, model_name, args) -> None:
    """A malformed argument is a usage error: non-zero exit naming the option, no traceback."""
    # When init gets a malformed argument
    with pytest.raises(SystemExit) as info:
        cli(["init", "--model", model_name, *args])
    captured = capsys.readouterr()
    # Then it exits non-zero, naming the option, and writes nothing
    assert info.value.code not in (0, None)
    assert args[0] in captured.err.splitlines()[-1]
    assert "Traceback" not in captured.err
    assert not redis_client.exists(ckpt_key(model_name))


@pytest.mark.parametrize("name", ["has space", "a}b", "x" * 65], ids=["space", "brace", "65-chars"])
def test_init_refuses_model_name_no_event_can_use(cli, capsys, redis_client, name) -> None:
    """A model name the event schema rejects would be a model no event can ever train: refused."""
    # When init is given a name that InteractionData.model does not accept
    try:
        code = cli(["init", "--model", name])
    except SystemExit as exc:  # an argparse usage error is a fine way to refuse it too
        code = exc.code
    captured = capsys.readouterr()
    # Then it fails without a traceback, and no model appears
    try:
        assert code not in (0, None), f"`itrain init --model {name!r}` created a model no event can name"
        assert "model" in captured.err
        assert "Traceback" not in captured.err
    finally:
        if redis_client.exists(ckpt_key(name)):  # leave the shared server clean
            redis_client.delete(ckpt_key(name))
            redis_client.srem("itrain:models", name)


# -- stats ----------------------------------------------------------------------------------------


def test_stats_json_prints_exactly_the_contract_keys(cli, capsys, model_name) -> None:
    """`stats --json` prints one JSON object with exactly the contract's keys."""
    # Given an initialised model
    assert cli(["init", "--model", model_name]) == 0
    # When its stats are printed as JSON
    stats = stats_json(cli, capsys, model_name)
    # Then the keys are exactly the contract's, with a fresh model's values
    assert set(stats) == CONTRACT_KEYS
    assert stats["model"] == model_name
    assert stats["initialized"] is True
    assert (stats["version"], stats["step"], stats["interactions"]) == (1, 0, 0)
    assert stats["interactions_by_action"] == {}
    assert (stats["history_len"], stats["failures"], stats["dead_letters"]) == (0, 0, 0)


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_stats_of_missing_model_exits_1_naming_it(cli, capsys, model_name, json_flag) -> None:
    """Stats of a model never initialised: a one-line error and exit 1, not zeros (a misspelt name
    must not look like an idle model)."""
    # When stats are asked for a model that does not exist
    code = cli(["stats", "--model", model_name, *json_flag])
    captured = capsys.readouterr()
    # Then the command fails with one line naming the model, and prints no stats
    assert code == 1
    assert captured.out == ""
    assert one_line(captured.err) == f"itrain: model {model_name!r} does not exist; " + (
        f"`itrain models` lists the models, `itrain init --model {model_name}` creates it"
    )


def test_stats_table_escapes_action_names(cli, capsys, redis_client, model_name) -> None:
    """Action names are event text: the table shows control characters escaped, and rich markup
    as it is, never as terminal codes or styles."""
    # Given a model whose counts hold an action name with an escape sequence and a markup tag
    assert cli(["init", "--model", model_name]) == 0
    capsys.readouterr()
    redis_client.hset(ModelKeys(model_name).actions, mapping={"\x1b[2Jwipe": 2, "[red]x[/red]": 1})
    # When the stats table is printed
    assert cli(["stats", "--model", model_name]) == 0
    out = capsys.readouterr().out
    # Then no raw ESC reaches the terminal, and both names are shown as text
    assert "\x1b" not in out
    assert "\\x1b[2Jwipe 2" in out
    assert "[red]x[/red] 1" in out


def test_stats_without_json_prints_a_table(cli, capsys, model_name) -> None:
    """`stats` without --json prints a human table naming the model and every figure."""
    # Given an initialised model
    assert cli(["init", "--model", model_name]) == 0
    capsys.readouterr()
    # When its stats are printed
    code = cli(["stats", "--model", model_name])
    out = capsys.readouterr().out
    # Then it is a table, not JSON, holding the model name and every key
    assert code == 0
    with pytest.raises(json.JSONDecodeError):
        json.loads(out)
    assert model_name in out
    for key in CONTRACT_KEYS - {"model"}:
        assert key in out
    assert len(out.splitlines()) > len(CONTRACT_KEYS)


def test_stats_table_names_this_server_as_the_master(cli, capsys, redis_server, model_name) -> None:
    """On a plain URL the table's `master` row is the server itself; `--json` has no such key."""
    # Given a model on the tests' own (master) server
    assert cli(["init", "--model", model_name]) == 0
    capsys.readouterr()
    # When its stats are printed as a table and as JSON
    assert cli(["stats", "--model", model_name]) == 0
    table = capsys.readouterr().out
    assert cli(["stats", "--model", model_name, "--json"]) == 0
    as_json = json.loads(capsys.readouterr().out)
    # Then the table names the server the store reaches as the master, the JSON does not
    rows = [line for line in table.splitlines() if line.startswith("| master ")]
    assert len(rows) == 1, table
    assert f"127.0.0.1:{redis_server.port} (this server)" in rows[0]
    assert "master" not in as_json


def test_stats_show_redis_memory_used(make_client, cli, capsys, model_name) -> None:
    """`stats` (JSON, table and client.stats) report the store's INFO memory used_memory, in bytes."""
    # Given a Redis of this test alone and an initialised model in it
    with RedisServer() as server:
        r = redis.Redis.from_url(server.url)
        client = make_client(server.url)
        before = client.stats(model_name)["redis_memory_used"]
        assert isinstance(before, int)
        assert before > 0
        # When 4 MiB more are stored
        r.set(f"itrain-test-ballast-{model_name}", b"x" * 4_194_304)
        after = client.stats(model_name)["redis_memory_used"]
        used = int(r.info("memory")["used_memory"])
        # Then the figure grows by at least that much and is the server's own figure
        assert after - before >= 4_194_304
        assert abs(after - used) < 1_048_576
        # and the CLI shows it, in JSON and in the table
        os.environ["ITRAIN_REDIS_URL"], saved = server.url, os.environ["ITRAIN_REDIS_URL"]
        try:
            get_settings.cache_clear()
            assert cli(["init", "--model", model_name]) == 0
            assert stats_json(cli, capsys, model_name)["redis_memory_used"] >= 4_194_304
            assert cli(["stats", "--model", model_name]) == 0
            table = capsys.readouterr().out
        finally:
            os.environ["ITRAIN_REDIS_URL"] = saved
            get_settings.cache_clear()
        assert "redis_memory_used" in table
        shown = re.search(r"redis_memory_used\s.*?(\d+) B \((\d+\.\d) MiB\)", table)
        assert shown, table
        assert int(shown[1]) >= 4_194_304
        assert shown[2] == f"{int(shown[1]) / 1_048_576:.1f}"


# -- failures -------------------------------------------------------------------------------------


def test_unreachable_redis_one_line_no_traceback_subprocess(redis_url) -> None:
    """With Redis unreachable `itrain stats` exits non-zero, one line on stderr, no traceback."""
    # When `itrain stats` runs against a port where nothing listens
    proc = run_itrain("stats", "--json", env={"ITRAIN_REDIS_URL": UNREACHABLE})
    # Then it fails cleanly, naming where it tried
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    line = one_line(proc.stderr)
    assert "127.0.0.1:1" in line
    assert proc.stdout.strip() == ""


def test_unreachable_redis_init_in_process(cli, capsys, monkeypatch) -> None:
    """`itrain init` with Redis unreachable: non-zero, one line, no traceback."""
    # Given settings pointing to a port where nothing listens
    monkeypatch.setenv("ITRAIN_REDIS_URL", UNREACHABLE)
    get_settings.cache_clear()
    # When init runs
    code = cli(["init", "--model", "m-unreachable"])
    captured = capsys.readouterr()
    # Then it fails with one line naming the server
    assert code != 0
    assert "127.0.0.1:1" in one_line(captured.err)
    assert "Traceback" not in captured.err


def test_bad_setting_one_line_no_traceback_subprocess(redis_url) -> None:
    """A malformed ITRAIN_* value: non-zero exit, one line naming the variable, no traceback."""
    # When `itrain stats` runs with an unparsable lock timeout
    proc = run_itrain("stats", env={"ITRAIN_REDIS_URL": redis_url, "ITRAIN_LOCK_TIMEOUT": "abc"})
    # Then it fails cleanly, naming the variable
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "ITRAIN_LOCK_TIMEOUT" in one_line(proc.stderr)


def test_bad_setting_in_process(cli, capsys, monkeypatch) -> None:
    """The same in process: ``main`` returns non-zero and prints one line."""
    # Given an inconsistent setting (dedupe TTL shorter than the visibility timeout)
    monkeypatch.setenv("ITRAIN_DEDUPE_TTL", "10")
    get_settings.cache_clear()
    # When any command runs
    code = cli(["stats", "--json"])
    captured = capsys.readouterr()
    # Then it fails before doing anything, with one line naming the setting
    assert code != 0
    assert "ITRAIN_DEDUPE_TTL" in one_line(captured.err)
    assert captured.out == ""


def test_init_weights_are_finite_little_endian_floats(cli, redis_client, model_name) -> None:
    """The stored params are raw little-endian float64 of the model's size (never pickle)."""
    # When a model is initialised
    assert cli(["init", "--model", model_name, "--hidden", "3"]) == 0
    # Then its params decode as <f8 of the right length, all finite
    params = redis_client.hget(ckpt_key(model_name), "params")
    theta = np.frombuffer(params, dtype="<f8")
    assert theta.size == Shape(4, 3, 1).size
    assert np.isfinite(theta).all()


def test_output_piped_into_a_reader_that_leaves_ends_quietly() -> None:
    """`itrain schema | head`: the reader may leave before the output is written; the command
    ends quietly (no broken-pipe message) with exit 0."""
    itrain = Path(sys.executable).parent / "itrain"
    # `true` reads nothing and exits at once: every write of itrain meets a closed pipe.
    done = subprocess.run(
        ["bash", "-c", f"set -o pipefail; '{itrain}' schema | true"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.stderr == ""
    assert done.returncode == 0
