"""The replayed frozen bottom: found only where it cannot change what is learned, and a model
replaying it gives the logits and gradients of a full forward pass."""

from __future__ import annotations

import pytest
import torch

import peftkit
from peftkit.caches.bottom import BottomOutputs, BottomReplay, compute_bottom_outputs, frozen_bottom
from peftkit.resolve import make_config
from peftkit.tasks import load_data
from peftkit.models import load_for_classification, load_tokenizer, resolve_model
from peftkit.strategies import build_strategy
from peftkit.tasks.classification import PadToLongest, tokenize
from peftkit.tasks import TASKS


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))


def model_with(model_name, strategy, options=None, **config_overrides):
    source = resolve_model(model_name)
    tokenizer = load_tokenizer(source)
    torch.manual_seed(0)
    model = load_for_classification(source, ["negative", "positive"], tokenizer)
    for key, value in config_overrides.items():
        setattr(model.config, key, value)
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = value
    return build_strategy(strategy, options or {}).apply(model, TASKS["classification"]), tokenizer


def test_frozen_bottom_is_below_the_lowest_trainable_layer():
    model, _ = model_with("tiny-llama", "partial", {"trainable_layers": 1})
    assert frozen_bottom(model) == model.config.num_hidden_layers - 1
    model, _ = model_with("tiny-llama", "partial", {"layers": [1]})
    assert frozen_bottom(model) == 1


@pytest.mark.parametrize("model_name,strategy,options", [
    ("tiny-bert", "partial", {"trainable_layers": 1}),  # dropout below: every step differs
    ("tiny-llama", "partial", {"trainable_layers": 1, "train_embeddings": True}),
    ("tiny-llama", "full", {}),
    ("tiny-llama", "linear-probe", {}),  # the head's inputs are cached instead
    ("tiny-llama", "lora", {}),
])
def test_nothing_to_replay(model_name, strategy, options):
    model, _ = model_with(model_name, strategy, options)
    assert frozen_bottom(model) == 0


def test_an_encoder_without_dropout_replays():
    model, _ = model_with("tiny-bert", "partial", {"trainable_layers": 1},
                          hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    assert frozen_bottom(model) == model.config.num_hidden_layers - 1


@pytest.mark.parametrize("model_name,dropout_free", [
    ("tiny-llama", {}),
    ("tiny-bert", {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}),
    pytest.param("smollm2-135m", {}, marks=pytest.mark.real),  # a real decoder: no dropout, so its bottom replays
])
def test_replay_gives_the_logits_and_gradients_of_a_full_forward_pass(data_dir, model_name, dropout_free):
    model, tokenizer = model_with(model_name, "partial", {"trainable_layers": 1}, **dropout_free)
    data = load_data(make_config({"task": "sst2", "data_dir": data_dir, "max_train_samples": 24}))
    dataset = tokenize(data.train, tokenizer, data.info["text_columns"], 64)
    collate = PadToLongest(tokenizer)
    bottom = frozen_bottom(model)
    outputs = BottomOutputs.joined([compute_bottom_outputs(model, bottom, dataset.select(range(10)), collate, 4),
                                    compute_bottom_outputs(model, bottom, dataset.select(range(10, 24)), collate, 4)])
    indices = torch.tensor([3, 17, 0, 11, 22])  # mixed lengths, from both parts: padding differs from the caching pass
    batch = collate([dataset[i] for i in indices.tolist()])
    assert (batch["attention_mask"] == 0).any()
    model.train()

    def logits_and_grads():
        model.zero_grad()
        out = model(**batch)
        out.loss.backward()
        return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}

    fresh_logits, fresh_grads = logits_and_grads()
    replay = BottomReplay(model, bottom, outputs)
    with replay.active():
        replay.use(indices, batch["attention_mask"])
        replayed_logits, replayed_grads = logits_and_grads()
    torch.testing.assert_close(replayed_logits, fresh_logits, atol=1e-5, rtol=1e-4)
    for name, grad in fresh_grads.items():
        torch.testing.assert_close(replayed_grads[name], grad, atol=1e-5, rtol=1e-4)
    after_logits, _ = logits_and_grads()  # outside `active()` the bottom computes again
    torch.testing.assert_close(after_logits, fresh_logits)


@pytest.mark.slow
def test_a_partial_run_replays_its_bottom_and_learns_the_same(data_dir, tmp_path):
    def run(cache, out):
        return peftkit.train({"model": "tiny-llama", "task": "sst2", "data_dir": data_dir, "max_train_samples": 64,
                              "max_eval_samples": 32, "epochs": 2, "batch_size": 8, "learning_rate": 1e-3,
                              "strategy": {"name": "partial", "trainable_layers": 1}, "cache_features": cache,
                              "output_dir": str(tmp_path / out)}).record

    replayed, computed = run(True, "replayed"), run(False, "computed")
    assert replayed.cached_bottom_layers == 1 and computed.cached_bottom_layers == 0
    assert replayed.metrics["loss"] == pytest.approx(computed.metrics["loss"], abs=1e-4)
    assert replayed.metrics["accuracy"] == computed.metrics["accuracy"]
