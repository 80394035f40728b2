"""The frozen-feature cache: features equal a fresh forward pass, and a cache built for one
model, maximum length or tokenizer is never reused for another."""

from __future__ import annotations

import pytest
import torch

from peftkit.tasks import TASKS
from peftkit.caches.features import FeatureStore, cache_key, cached_head_inputs
from peftkit.resolve import make_config
from peftkit.tasks import load_data
from peftkit.models import load_for_classification, load_tokenizer, resolve_model
from peftkit.pooling import read_with
from peftkit.tasks.classification import PadToLongest, tokenize


def setup(model_name, data_dir, max_length=64, n=40):
    source = resolve_model(model_name)
    tokenizer = load_tokenizer(source)
    data = load_data(make_config({"task": "sst2", "data_dir": data_dir, "max_train_samples": n}))
    dataset = tokenize(data.train, tokenizer, data.info["text_columns"], max_length)
    torch.manual_seed(0)
    model = load_for_classification(source, data.info["label_names"], tokenizer).eval()
    return source, tokenizer, dataset, model


@pytest.fixture(autouse=True)
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PEFTKIT_CACHE", str(tmp_path / "cache"))


@pytest.mark.parametrize("model_name,head", [("tiny-bert", "classifier"), ("tiny-llama", "score")])
def test_head_on_cached_features_equals_a_fresh_forward_pass(data_dir, model_name, head):
    source, tokenizer, dataset, model = setup(model_name, data_dir)
    collate = PadToLongest(tokenizer)
    features = cached_head_inputs(FeatureStore(), model, source.path, tokenizer, dataset, collate, 64, batch_size=16)
    assert features.shape == (40, 64)
    with torch.no_grad():
        fresh = torch.cat([model(**{k: v for k, v in collate([dataset[i]]).items() if k != "labels"}).logits
                           for i in range(len(dataset))])
        from_cache = model.get_submodule(head)(features)
    torch.testing.assert_close(from_cache, fresh, atol=1e-5, rtol=1e-5)


def test_second_call_reads_the_cache(data_dir, monkeypatch):
    source, tokenizer, dataset, model = setup("tiny-bert", data_dir)
    collate = PadToLongest(tokenizer)
    computing, reading = FeatureStore(), FeatureStore()
    first = cached_head_inputs(computing, model, source.path, tokenizer, dataset, collate, 64, batch_size=16)
    monkeypatch.setattr("peftkit.caches.features.head_inputs", lambda *a, **k: pytest.fail("recomputed a cached result"))
    assert torch.equal(cached_head_inputs(reading, model, source.path, tokenizer, dataset, collate, 64, batch_size=16), first)
    # the work is counted where it was done and where it is read back: the stored seconds travel with the value
    assert computing.source == "computed" and reading.source == "loaded" and FeatureStore().source is None
    assert reading.seconds == computing.seconds > 0


def test_key_changes_with_model_length_tokenizer_and_data(data_dir):
    source, tokenizer, dataset, _ = setup("tiny-bert", data_dir)
    base = cache_key(source.path, tokenizer, dataset, 64, "classifier")
    other_model = resolve_model("tiny-llama").path
    assert cache_key(other_model, tokenizer, dataset, 64, "classifier") != base
    assert cache_key(source.path, tokenizer, dataset, 32, "classifier") != base
    other_tokenizer = load_tokenizer(source)
    other_tokenizer.padding_side = "left"
    assert cache_key(source.path, other_tokenizer, dataset, 64, "classifier") != base
    assert cache_key(source.path, tokenizer, dataset.select(range(10)), 64, "classifier") != base
    assert cache_key(source.path, load_tokenizer(source), dataset, 64, "classifier") == base


def test_changed_weights_change_the_key(data_dir, tmp_path):
    source, tokenizer, dataset, model = setup("tiny-bert", data_dir)
    copy = tmp_path / "copy"
    model.base_model.save_pretrained(copy)
    before = cache_key(str(copy), tokenizer, dataset, 64, "classifier")
    with torch.no_grad():
        model.base_model.embeddings.word_embeddings.weight[0] += 1
    model.base_model.save_pretrained(copy)
    assert cache_key(str(copy), tokenizer, dataset, 64, "classifier") != before


def test_linear_probe_run_trains_on_cached_features(tmp_path, data_dir):
    import peftkit

    result = peftkit.train({"model": "tiny-bert", "task": "sst2", "data_dir": data_dir, "strategy": "linear-probe",
                            "max_train_samples": 64, "max_eval_samples": 48, "epochs": 2, "output_dir": tmp_path / "run"})
    assert result.record.cached_features is True and result.record.frozen_features == "computed"
    again = peftkit.train({**result.record.config, "output_dir": str(tmp_path / "again")})
    assert again.record.frozen_features == "loaded"  # an identical run reads them back, and says so
    uncached = peftkit.train({**result.record.config, "cache_features": False, "output_dir": str(tmp_path / "run2")})
    assert uncached.record.cached_features is False


def test_mean_pooling_features_reproduce_the_model_and_reload(tmp_path, data_dir):
    import peftkit
    from peftkit.loading import load_run
    from peftkit.strategies import build_strategy

    source, tokenizer, dataset, _ = setup("tiny-bert", data_dir)
    torch.manual_seed(0)
    model = read_with("mean", load_for_classification(source, ["a", "b"], tokenizer), lambda plain: build_strategy("linear-probe").apply(plain, TASKS["classification"])).eval()
    collate = PadToLongest(tokenizer)
    features = cached_head_inputs(FeatureStore(), model, source.path, tokenizer, dataset, collate, 64, batch_size=16, variant="mean")
    torch.manual_seed(0)
    plain_model = load_for_classification(source, ["a", "b"], tokenizer)
    plain = cached_head_inputs(FeatureStore(), plain_model, source.path, tokenizer, dataset, collate, 64, batch_size=16, variant="model")
    assert not torch.equal(features, plain)  # another variant is another cache entry, and other features
    batch = {k: v for k, v in collate([dataset[i] for i in range(8)]).items() if k != "labels"}
    with torch.no_grad():
        torch.testing.assert_close(model.classifier(features[:8]), model(**batch).logits, atol=1e-5, rtol=1e-5)
    run = peftkit.train({"model": "tiny-bert", "task": "sst2", "data_dir": data_dir, "max_train_samples": 64,
                         "max_eval_samples": 48, "epochs": 1, "output_dir": tmp_path / "run",
                         "strategy": "linear-probe", "pooling": "mean"})
    again = [load_run(run.output_dir)[1](**batch).logits for _ in range(2)]
    assert torch.equal(again[0], again[1])


def test_mean_pooling_refuses_per_token_heads():
    from peftkit.errors import PeftkitError
    from peftkit.strategies import build_strategy

    source = resolve_model("tiny-llama")
    model = load_for_classification(source, ["a", "b"], load_tokenizer(source))
    with pytest.raises(PeftkitError, match="pooling=mean needs a head that reads one vector"):
        read_with("mean", model, build_strategy("linear-probe").apply)
