"""The README stays true to the code: every setting is in its configuration table, and every
module and function its pipeline map names exists."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

from producer.settings import Settings

README = (Path(__file__).resolve().parents[2] / "README.md").read_text()


def test_every_setting_is_in_the_configuration_table() -> None:
    documented = set(re.findall(r"^\| `(ITRAIN_[A-Z_]+)` \|", README, flags=re.M))
    expected = {f"ITRAIN_{name.upper()}" for name in Settings.model_fields}
    assert expected - documented == set(), "settings missing from the README's table"
    assert documented - expected == set(), "README documents settings that do not exist"


def test_pipeline_map_names_real_functions() -> None:
    section = README.split("## The spec's pipeline, step by step", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if re.match(r"^\| \d\. ", line)]
    assert len(rows) == 7, "one row per step of the spec's pipeline"
    for row in rows:
        where = row.split("|")[2]
        for module in re.findall(r"`(worker/\w+\.py)`", where):
            mod = importlib.import_module(module[:-3].replace("/", "."))
            # every name quoted after this module in the cell, up to the next module
            tail = where.split(module, 1)[1].split("`worker/", 1)[0]
            for name in re.findall(r"`([A-Za-z_][\w.]*)`", tail):
                if name.isupper():
                    continue  # Redis commands and settings, not Python names
                obj = mod
                for part in name.split("."):
                    assert hasattr(obj, part), f"{module} has no {name}"
                    obj = getattr(obj, part)
