"""Bottleneck adapters (strategy `adapter`): exactly which parameters train for each variant
and architecture, zero-up init is a no-op, what each variant reads and adds to, layer choice,
unmappable models, a 4-bit base, and train/save/reload end to end. Expected names and counts
are written out by hand from the tiny architectures (hidden 64, 2 layers)."""

from __future__ import annotations

import pytest
import torch
from transformers import (AutoModelForSequenceClassification, BitsAndBytesConfig, DistilBertConfig, GPT2Config,
                          T5Config)

import peftkit
from peftkit.errors import PeftkitError
from peftkit.inference import evaluate_run
from peftkit.measure import count_parameters
from peftkit.models import load_for_classification, load_tokenizer, resolve_model
from peftkit.run import load_run
from peftkit.strategies import build_strategy

H, L = 64, 2
HEADS = {"tiny-bert": {"classifier.weight": 2 * H, "classifier.bias": 2}, "tiny-llama": {"score.weight": 2 * H}}
# Projections adapters attach to, inside one layer: (attention output, feed-forward output).
PROJECTIONS = {
    "tiny-bert": ("bert.encoder.layer.{i}.attention.output.dense", "bert.encoder.layer.{i}.output.dense"),
    "tiny-llama": ("model.layers.{i}.self_attn.o_proj", "model.layers.{i}.mlp.down_proj"),
}
WHERE = {"houlsby": (0, 1), "pfeiffer": (1,), "parallel": (1,)}  # which of PROJECTIONS each variant adapts
SENTENCES = ["a gripping , funny film", "dull and far too long"]


def base_model(model_name: str, quantization=None):
    source = resolve_model(model_name)
    torch.manual_seed(0)
    return load_for_classification(source, ["neg", "pos"], load_tokenizer(source), quantization)


def adapted(model_name: str, **options):
    model = build_strategy("adapter", options).apply(base_model(model_name))
    return model.eval()


def tiny_from_config(config):
    torch.manual_seed(0)
    return AutoModelForSequenceClassification.from_config(config).eval()


def tiny_gpt2():
    return tiny_from_config(GPT2Config(n_embd=H, n_layer=L, n_head=2, vocab_size=100, n_positions=64,
                                       bos_token_id=0, eos_token_id=0, pad_token_id=0, num_labels=2))


def tiny_t5():
    return tiny_from_config(T5Config(d_model=H, d_ff=128, num_layers=L, num_heads=2, d_kv=32, vocab_size=100,
                                     decoder_start_token_id=0, pad_token_id=0, num_labels=2))


def trainable(model) -> dict[str, int]:
    return {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}


def adapter_params(projection: str, width: int = H, bottleneck: int = H // 16) -> dict[str, int]:
    return {f"{projection}.adapter.down.weight": width * bottleneck, f"{projection}.adapter.down.bias": bottleneck,
            f"{projection}.adapter.up.weight": bottleneck * width, f"{projection}.adapter.up.bias": width}


def expectation(model_name: str, variant: str, layers=range(L), bottleneck: int = H // 16) -> dict[str, int]:
    expected = dict(HEADS[model_name])
    for i in layers:
        for site in WHERE[variant]:
            expected |= adapter_params(PROJECTIONS[model_name][site].format(i=i), bottleneck=bottleneck)
    return expected


def logits(model, tokenizer) -> torch.Tensor:
    batch = tokenizer(SENTENCES, padding=True, return_tensors="pt")
    with torch.no_grad():
        return model(**batch).logits


def token_logits(model) -> torch.Tensor:
    with torch.no_grad():  # token 1 is T5's <eos>, which its classifier pools on
        return model(input_ids=torch.tensor([[5, 6, 7, 1], [9, 10, 11, 1]])).logits


@pytest.mark.parametrize("model_name", ["tiny-bert", "tiny-llama"])
@pytest.mark.parametrize("variant", ["houlsby", "pfeiffer", "parallel"])
def test_trains_exactly_the_adapters_and_the_head(model_name, variant):
    model = adapted(model_name, variant=variant)
    expected = expectation(model_name, variant)
    assert trainable(model) == expected
    assert count_parameters(model)[0] == sum(expected.values())


def test_counts_match_hand_arithmetic():
    # one adapter at hidden 64, bottleneck 4: 64*4 + 4 + 4*64 + 64 = 580
    assert sum(expectation("tiny-bert", "houlsby").values()) == 4 * 580 + 130
    assert sum(expectation("tiny-llama", "pfeiffer").values()) == 2 * 580 + 128


def test_gpt2_conv1d_projections():
    model = build_strategy("adapter", {"variant": "houlsby"}).apply(tiny_gpt2())
    expected = {"score.weight": 2 * H}
    for i in range(L):
        expected |= adapter_params(f"transformer.h.{i}.attn.c_proj") | adapter_params(f"transformer.h.{i}.mlp.c_proj")
    assert trainable(model) == expected


def test_t5_adapts_the_decoder_stack_after_its_last_sublayer():
    # inspect_model's stack for T5ForSequenceClassification is the decoder (the larger one);
    # its feed-forward is sub-layer 2, after self-attention (0) and cross-attention (1).
    model = build_strategy("adapter", {}).apply(tiny_t5())
    expected = {n: p.numel() for n, p in model.named_parameters() if n.startswith("classification_head.")}
    assert len(expected) == 4
    for i in range(L):
        expected |= adapter_params(f"transformer.decoder.block.{i}.layer.2.DenseReluDense.wo")
    assert trainable(model) == expected


@pytest.mark.parametrize("model_name", ["tiny-bert", "tiny-llama"])
@pytest.mark.parametrize("variant", ["houlsby", "pfeiffer", "parallel"])
def test_zero_up_init_leaves_logits_unchanged_and_bert_init_changes_them(model_name, variant):
    tokenizer = load_tokenizer(resolve_model(model_name))
    before = logits(base_model(model_name).eval(), tokenizer)
    assert torch.equal(logits(adapted(model_name, variant=variant), tokenizer), before)
    assert not torch.allclose(logits(adapted(model_name, variant=variant, init="bert"), tokenizer), before)


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_t5])
def test_zero_up_init_leaves_gpt2_and_t5_unchanged(make):
    before = token_logits(make())
    assert torch.equal(token_logits(build_strategy("adapter", {"variant": "houlsby"}).apply(make())), before)


@pytest.mark.parametrize("variant", ["houlsby", "pfeiffer", "parallel"])
def test_each_variant_reads_and_adds_where_it_should(variant):
    # Llama's mlp contains down_proj, so one call of a layer's mlp/o_proj shows the whole rule.
    base = base_model("tiny-llama").model.layers[0]
    layer = adapted("tiny-llama", variant=variant, init="bert", scaling=0.5).model.layers[0]
    x = torch.randn(2, 3, H)
    with torch.no_grad():
        mlp_base, mlp = base.mlp(x), layer.mlp(x)
        o_base, o = base.self_attn.o_proj(x), layer.self_attn.o_proj(x)
        adapter = layer.mlp.down_proj.adapter
        if variant == "parallel":  # reads the block's input, scaled
            assert adapter.scaling == 0.5
            assert torch.allclose(mlp, mlp_base + adapter(x), atol=1e-6)
        else:  # reads the projection's own output; scaling is for parallel only
            assert adapter.scaling == 1.0
            assert torch.allclose(mlp, mlp_base + adapter(mlp_base), atol=1e-6)
        if variant == "houlsby":
            assert torch.allclose(o, o_base + layer.self_attn.o_proj.adapter(o_base), atol=1e-6)
        else:
            assert torch.equal(o, o_base)


def test_parallel_on_bert_reads_the_intermediate_input():
    # In BERT the feed-forward block's input (`intermediate`) and its output projection
    # (`output.dense`) are siblings: the adapter's input is captured by a pre-hook.
    base = base_model("tiny-bert").bert.encoder.layer[0]
    layer = adapted("tiny-bert", variant="parallel", init="bert").bert.encoder.layer[0]
    x = torch.randn(2, 3, H)
    with torch.no_grad():
        inner = layer.intermediate(x)
        out = layer.output.dense(inner)
        assert torch.allclose(out, base.output.dense(inner) + layer.output.dense.adapter(x), atol=1e-6)


def test_layers_choose_where_and_bottleneck_size_overrides_reduction_factor():
    model = adapted("tiny-bert", layers="1", bottleneck_size=8, reduction_factor=2)
    assert trainable(model) == expectation("tiny-bert", "pfeiffer", layers=[1], bottleneck=8)
    assert trainable(adapted("tiny-bert", reduction_factor=2)) == expectation("tiny-bert", "pfeiffer", bottleneck=32)


def test_rejects_layers_the_model_lacks_and_bad_options():
    with pytest.raises(PeftkitError, match="do not exist"):
        adapted("tiny-bert", layers="0-5")
    with pytest.raises(PeftkitError, match="option 'variant'"):
        build_strategy("adapter", {"variant": "lora"})
    with pytest.raises(PeftkitError, match="dropout"):
        build_strategy("adapter", {"dropout": 1.5})


def test_unmapped_architecture_names_what_it_looked_for():
    model = tiny_from_config(DistilBertConfig(dim=H, hidden_dim=128, n_layers=L, n_heads=2, vocab_size=100))
    message = r"DistilBertForSequenceClassification.*looked for.*attention\.output\.dense"
    with pytest.raises(PeftkitError, match=message):
        build_strategy("adapter", {}).apply(model)


def test_4bit_base_gets_float32_adapters_that_learn():
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=torch.float32)
    model = build_strategy("adapter", {"init": "bert"}).apply(base_model("tiny-llama", quantization))
    projection = model.model.layers[0].mlp.down_proj
    assert type(projection.weight).__name__ == "Params4bit"
    assert {p.dtype for p in projection.adapter.parameters()} == {torch.float32}
    assert trainable(model) == expectation("tiny-llama", "pfeiffer")
    batch = load_tokenizer(resolve_model("tiny-llama"))(SENTENCES, padding=True, return_tensors="pt")
    model(**batch, labels=torch.tensor([0, 1])).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if ".adapter." in n}
    assert len(grads) == 8 and all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_train_save_reload_gives_identical_results(tmp_path, data_dir):
    result = peftkit.train({
        "model": "tiny-bert", "task": "sst2", "data_dir": data_dir, "max_train_samples": 64, "max_eval_samples": 48,
        "epochs": 1, "batch_size": 16, "strategy": {"name": "adapter", "variant": "houlsby"},
        "output_dir": tmp_path / "run",
    })
    assert result.record["trainable_params"] == sum(expectation("tiny-bert", "houlsby").values())
    _, model, tokenizer, _ = load_run(result.output_dir)
    _, again, _, _ = load_run(result.output_dir)
    assert torch.equal(logits(model.eval(), tokenizer), logits(again.eval(), tokenizer))
    assert not torch.equal(model.bert.encoder.layer[0].output.dense.adapter.up.weight, torch.zeros(H, H // 16))
    reproduced = evaluate_run(result.output_dir)["metrics"]
    assert round(reproduced["accuracy"], 4) == round(result.metrics["accuracy"], 4)
    assert reproduced["loss"] == pytest.approx(result.metrics["loss"], abs=1e-5)


@pytest.mark.real
def test_minilm_pfeiffer_counts_and_zero_up_is_a_no_op():
    source = resolve_model("minilm")
    tokenizer = load_tokenizer(source)
    torch.manual_seed(0)
    before = logits(load_for_classification(source, ["neg", "pos"], tokenizer).eval(), tokenizer)
    torch.manual_seed(0)
    model = build_strategy("adapter", {}).apply(load_for_classification(source, ["neg", "pos"], tokenizer)).eval()
    assert count_parameters(model)[0] == 6 * (384 * 24 + 24 + 24 * 384 + 384) + 770
    assert torch.equal(logits(model, tokenizer), before)
