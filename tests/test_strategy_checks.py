"""Impossible (strategy, model) combinations stop before any data or weights load: one line,
exit code 2, nothing written."""

from __future__ import annotations

import pytest
from transformers import T5Config

from peftkit.tasks import TASKS
from test_cli import assert_clean_failure, invoke


@pytest.fixture(autouse=True)
def nothing_loads(monkeypatch):
    """The checks must come first: loading data or weights fails these tests."""

    def forbidden(*args, **kwargs):
        raise AssertionError("data or weights loaded before the strategy check")

    for task in TASKS.values():
        monkeypatch.setattr(type(task), "load_data", forbidden)
        monkeypatch.setattr(type(task), "load_model", forbidden)


def test_prefix_tuning_is_rejected_where_the_model_takes_no_key_value_cache(tmp_path, data_dir):
    from transformers import DistilBertConfig

    model_dir = tmp_path / "distilbert"  # an encoder with no cache argument at all
    DistilBertConfig(dim=64, hidden_dim=128, n_layers=2, n_heads=2).save_pretrained(model_dir)
    out = tmp_path / "out"
    result = invoke("train", "--task", "sst2", "--model", model_dir, "--strategy", "prefix-tuning", "--data-dir", data_dir, "--output-dir", out)
    assert_clean_failure(result, "prefix-tuning cannot train DistilBertForSequenceClassification: PEFT", out)


def test_prefix_like_peft_method_is_rejected_too(tmp_path, data_dir):
    out = tmp_path / "out"
    result = invoke("train", "--task", "sst2", "--model", "tiny-bert", "--strategy", "peft:cartridge", "--set", "num_virtual_tokens=4",
                    "--data-dir", data_dir, "--output-dir", out)
    assert_clean_failure(result, "peft:cartridge cannot train BertForSequenceClassification", out)


@pytest.mark.parametrize("strategy", ["prompt-tuning", "p-tuning"])
def test_prompt_learning_is_rejected_on_an_encoder_decoder(tmp_path, data_dir, strategy):
    model_dir = tmp_path / "t5"
    T5Config(d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4).save_pretrained(model_dir)
    out = tmp_path / "out"
    result = invoke("train", "--task", "sst2", "--model", model_dir, "--strategy", strategy, "--data-dir", data_dir, "--output-dir", out)
    assert_clean_failure(result, f"{strategy} cannot train a t5 classifier: encoder-decoder", out)


@pytest.mark.parametrize("strategy,message", [
    ("peft:adalora", "strategy peft:adalora cannot train here: AdaLoRA"),
    ("peft:trainable_tokens", "strategy peft:trainable_tokens cannot train task 'classification': its config has no modules_to_save"),
    ("peft:cpt", "peft:cpt"),
])
def test_peft_methods_that_cannot_classify(tmp_path, data_dir, strategy, message):
    out = tmp_path / "out"
    result = invoke("train", "--task", "sst2", "--model", "tiny-bert", "--strategy", strategy, "--data-dir", data_dir, "--output-dir", out)
    assert_clean_failure(result, message, out)


def test_prompt_tuning_text_init_needs_its_text(tmp_path, data_dir):
    out = tmp_path / "out"
    result = invoke("train", "--task", "sst2", "--model", "tiny-bert", "--strategy", "prompt-tuning", "--set", "init=text",
                    "--data-dir", data_dir, "--output-dir", out)
    assert_clean_failure(result, "prompt-tuning takes init_text together with init=text", out)


def test_quantized_base_with_full_fine_tuning_is_one_line(tmp_path, data_dir):
    out = tmp_path / "out"
    result = invoke("train", "--task", "sst2", "--model", "tiny-bert", "--strategy", "full", "--quantization", "nf4",
                    "--data-dir", data_dir, "--output-dir", out)
    assert_clean_failure(result, "strategy 'full' trains the base weights, which a 4-bit base cannot update", out)
