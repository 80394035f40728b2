"""RunConfig: one schema for recipes, flags and the Python API."""

from __future__ import annotations

from pathlib import Path

import pytest

from peftkit.options import RunConfig
from peftkit.recipes import apply_overrides, load_recipe
from peftkit.resolve import make_config
from peftkit.errors import PeftkitError

REPO = Path(__file__).resolve().parents[1]


def test_strategy_as_name_or_mapping_normalises_with_defaults():
    by_name = make_config({"strategy": "lora"})
    by_map = make_config({"strategy": {"name": "lora", "r": 8}})
    assert by_name.strategy.options == by_map.strategy.options
    assert by_map.model_dump()["strategy"] == {"name": "lora", **by_map.strategy.options}


def test_overrides_reach_run_fields_and_strategy_options():
    values = apply_overrides({"strategy": {"name": "lora", "r": 4}}, ["r=16", "strategy.alpha=64", "epochs=2", "target_modules=[query, value]"])
    config = make_config(values)
    assert config.strategy.options["r"] == 16 and config.strategy.options["alpha"] == 64
    assert config.strategy.options["target_modules"] == ["query", "value"]
    assert config.epochs == 2.0


def test_typo_in_recipe_key_suggests_the_field():
    with pytest.raises(PeftkitError, match="unknown option 'learnin_rate' \\(did you mean 'learning_rate'\\?\\)"):
        make_config({"learnin_rate": 1e-3})


def test_wrong_type_names_the_option():
    with pytest.raises(PeftkitError, match="option 'epochs'"):
        make_config({"epochs": "many"})


def test_impossible_data_combination():
    with pytest.raises(PeftkitError, match="validation_file"):
        make_config({"train_file": "x.csv"})


@pytest.mark.parametrize("strategy, message", [("full", "trains the base weights"), ("partial", "trains the base weights"),
                                               ("qlora", "quantizes the base itself")])
def test_quantized_base_refuses_strategies_that_cannot_use_it(strategy, message):
    with pytest.raises(PeftkitError, match=message):
        make_config({"strategy": strategy, "quantization": "nf4"})
    assert make_config({"strategy": "adapter", "quantization": "nf4"}).quantization == "nf4"


def test_learning_rate_defaults_to_the_strategy():
    assert make_config({"strategy": "linear-probe"}).lr > make_config({"strategy": "full"}).lr


def test_every_recipe_validates():
    recipes = sorted((REPO / "recipes").glob("*.yaml"))
    assert len(recipes) >= 9
    for recipe in recipes:
        text = recipe.read_text()
        assert text.startswith(f"# peftkit train --recipe recipes/{recipe.name}"), recipe
        config = make_config(load_recipe(recipe))
        assert isinstance(config, RunConfig)


def test_unreadable_recipe(tmp_path):
    with pytest.raises(PeftkitError, match="cannot read recipe"):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(PeftkitError, match="not valid YAML"):
        load_recipe(bad)


def test_auto_dtype_on_a_gpu_follows_an_explicit_precision(monkeypatch):
    import peftkit.precision

    monkeypatch.setattr(peftkit.precision, "native_precision", lambda device: "bf16")  # as on a GPU with bf16
    assert make_config({"model": "tiny-bert"}).weights_dtype() == "bf16"
    fp32 = make_config({"model": "tiny-bert", "precision": "fp32"})  # refused before: dtype bf16 vs precision fp32
    assert (fp32.weights_dtype(), fp32.compute_precision()) == ("fp32", "fp32")
    fp16 = make_config({"model": "tiny-bert", "precision": "fp16"})
    assert (fp16.weights_dtype(), fp16.compute_precision()) == ("fp16", "fp16")
    monkeypatch.setattr(peftkit.precision, "native_precision", lambda device: "fp32")  # a CPU without bf16
    assert make_config({"model": "tiny-bert", "precision": "bf16"}).weights_dtype() == "fp32"


@pytest.mark.parametrize("capabilities, forced, native", [
    ({"avx512_bf16": True}, "", "bf16"), ({"amx_bf16": True}, "", "bf16"), ({"avx2": True}, "", "fp32"),
    ({"avx512_bf16": True}, "0", "fp32"), ({"avx2": True}, "1", "bf16")])
def test_auto_on_cpu_is_bf16_where_the_cpu_computes_it_natively(monkeypatch, capabilities, forced, native):
    """auto on CPU: bf16 weights and autocast where the CPU has AVX512-BF16 or AMX, fp32
    elsewhere; PEFTKIT_CPU_BF16=0/1 overrides the detection (the test suite pins 0)."""
    import torch

    monkeypatch.setattr(torch.cpu, "get_capabilities", lambda: capabilities)
    monkeypatch.setenv("PEFTKIT_CPU_BF16", forced)
    config = make_config({"model": "tiny-bert"})
    assert (config.weights_dtype("cpu"), config.compute_precision("cpu")) == (native, native)
    explicit = make_config({"model": "tiny-bert", "precision": "fp32"})
    assert (explicit.weights_dtype("cpu"), explicit.compute_precision("cpu")) == ("fp32", "fp32")
    assert make_config({"model": "tiny-bert"}).weights_dtype("cuda") == "bf16"  # a GPU decides for itself


def test_a_bad_cpu_bf16_override_is_refused_in_one_line(monkeypatch):
    """PEFTKIT_CPU_BF16=yes is a typo, not a third setting: silently detecting would hide it."""
    monkeypatch.setenv("PEFTKIT_CPU_BF16", "yes")
    with pytest.raises(PeftkitError, match="PEFTKIT_CPU_BF16 must be 0 or 1, not 'yes'"):
        make_config({"model": "tiny-bert"}).weights_dtype("cpu")
