"""Provenance: every record names its code version and config hash; compare re-runs a cell
whose config changed; report refuses rows made by different code unless told to."""

from __future__ import annotations

import re

import pytest

from peftkit.compare import append_run, pending, plan
from peftkit.resolve import make_config
from peftkit.errors import PeftkitError
from peftkit.provenance import code_version, config_hash
from peftkit.record import CellRecord
from peftkit.report.write import write_report
from test_compare import fake


def test_config_hash_ignores_where_things_are_not_what_is_computed(tmp_path):
    base = {"task": "sst2", "strategy": "lora"}
    assert config_hash(make_config(base)) == config_hash(make_config({**base, "output_dir": tmp_path, "data_dir": tmp_path}))
    assert config_hash(make_config(base)) != config_hash(make_config({**base, "learning_rate": 1e-4}))


def test_code_version_names_this_checkout():
    version = code_version()
    assert re.fullmatch(r"[0-9a-f]{40}", version["commit"]) and isinstance(version["dirty"], bool)


def test_compare_reruns_a_cell_whose_config_changed(tmp_path, data_dir):
    cells = plan("tiny-bert", "sst2", ["lora"], [0], tmp_path, None, [], data_dir)
    made = {"commit": "a" * 40, "dirty": False, "config_hash": config_hash(cells[0].config)}
    recorded = {"lora/seed0": CellRecord.model_validate({**fake("lora", 0, 0.8, 100), "provenance": made})}
    assert pending(cells, recorded, retry_failed=False) == []
    changed = plan("tiny-bert", "sst2", ["lora"], [0], tmp_path, None, ["r=16"], data_dir)
    assert pending(changed, recorded, retry_failed=False) == changed


def test_report_refuses_rows_from_different_code(tmp_path):
    for seed, commit in enumerate(("a" * 40, "b" * 40)):
        made = {"commit": commit, "dirty": False, "config_hash": "0" * 16}
        append_run(tmp_path, CellRecord.model_validate({**fake("lora", seed, 0.8, 100), "provenance": made}))
    with pytest.raises(PeftkitError, match="mixes rows made by 2 code versions .*--allow-mixed"):
        write_report(tmp_path)
    paths = write_report(tmp_path, allow_mixed=True)
    assert "Code: aaaaaaaaaaaa" in (tmp_path / "results.md").read_text() and paths
