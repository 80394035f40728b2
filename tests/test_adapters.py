"""Bottleneck adapters (strategy `adapter`): each variant's forward equals a hand-written
reference of its published design on a tiny BERT (and its pre-LN form on Llama); exactly which
parameters train for each variant and architecture; zero-up init is a no-op; scaling applies to
every variant; layer choice, unmappable models, a 4-bit base, and train/save/reload end to end.
Expected names and counts are written out by hand from the tiny architectures (hidden 64, 2
layers)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import (AutoModelForSequenceClassification, BartConfig, BitsAndBytesConfig, DistilBertConfig,
                          GPT2Config, T5Config)

import peftkit
from peftkit.tasks import task_for_model
from peftkit.errors import PeftkitError
from peftkit.inference import evaluate_run
from peftkit.measure import count_parameters
from peftkit.models import load_for_classification, load_tokenizer, resolve_model
from peftkit.loading import load_run
from peftkit.strategies import build_strategy
from peftkit.tasks import TASKS

H, L = 64, 2
HEADS = {"tiny-bert": {"classifier.weight": 2 * H, "classifier.bias": 2}, "tiny-llama": {"score.weight": 2 * H}}
LAYERS = {"tiny-bert": "bert.encoder.layer", "tiny-llama": "model.layers"}
WHERE = {"houlsby": ("adapter_attention", "adapter_ffn"), "pfeiffer": ("adapter_ffn",), "parallel": ("adapter_ffn",)}
DEFAULT_BOTTLENECK = {"houlsby": H // 16, "pfeiffer": H // 16, "parallel": H // 2}  # the published reduction factors
SENTENCES = ["a gripping , funny film", "dull and far too long"]


def base_model(model_name: str, quantization=None):
    source = resolve_model(model_name)
    torch.manual_seed(0)
    return load_for_classification(source, ["neg", "pos"], load_tokenizer(source), quantization)


def adapted(model_name: str, **options):
    model = build_strategy("adapter", options).apply(adapted_model := base_model(model_name), task_for_model(adapted_model))
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


def adapter_params(prefix: str, width: int = H, bottleneck: int = H // 16) -> dict[str, int]:
    return {f"{prefix}.down.weight": width * bottleneck, f"{prefix}.down.bias": bottleneck,
            f"{prefix}.up.weight": bottleneck * width, f"{prefix}.up.bias": width}


def expectation(model_name: str, variant: str, layers=range(L), bottleneck: int | None = None) -> dict[str, int]:
    expected = dict(HEADS[model_name])
    for i in layers:
        for name in WHERE[variant]:
            expected |= adapter_params(f"{LAYERS[model_name]}.{i}.{name}", bottleneck=bottleneck or DEFAULT_BOTTLENECK[variant])
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
    model = build_strategy("adapter", {"variant": "houlsby"}).apply(adapted_model := tiny_gpt2(), task_for_model(adapted_model))
    expected = {"score.weight": 2 * H}
    for i in range(L):
        expected |= adapter_params(f"transformer.h.{i}.adapter_attention") | adapter_params(f"transformer.h.{i}.adapter_ffn")
    assert trainable(model) == expected


def test_t5_adapts_both_stacks_after_their_last_sublayer():
    # an encoder-decoder gets adapters in its encoder and its decoder, as AdapterHub places them;
    # T5's feed-forward is the last sub-layer: 1 in the encoder (after self-attention), 2 in the
    # decoder (after self-attention and cross-attention).
    model = build_strategy("adapter", {"variant": "pfeiffer", "init": "bert"}).apply(adapted_model := tiny_t5(), task_for_model(adapted_model))
    expected = {n: p.numel() for n, p in model.named_parameters() if n.startswith("classification_head.")}
    assert len(expected) == 4
    for stack in ("encoder", "decoder"):
        for i in range(L):
            expected |= adapter_params(f"transformer.{stack}.block.{i}.adapter_ffn")
    assert trainable(model) == expected
    x = torch.randn(2, 3, H)
    for block, ffn in ((model.transformer.encoder.block[0], 1), (model.transformer.decoder.block[0], 2)):
        sublayer = block.layer[ffn]
        with torch.no_grad():  # pre-LN pfeiffer: the feed-forward sub-layer gives x + h + A(x + h)
            plain = x + sublayer.dropout.forward(sublayer.DenseReluDense(sublayer.layer_norm.forward(x)))
            assert torch.allclose(sublayer(x), plain + block.adapter_ffn(plain), atol=1e-6)


def test_layers_of_an_encoder_decoder_count_in_each_stack():
    model = build_strategy("adapter", {"variant": "houlsby", "layers": "1"}).apply(adapted_model := tiny_t5(), task_for_model(adapted_model))
    adapted = sorted({n.split(".adapter_")[0] for n in trainable(model) if ".adapter_" in n})
    assert adapted == ["transformer.decoder.block.1", "transformer.encoder.block.1"]
    with pytest.raises(PeftkitError, match=r"adapter layers \[2\] do not exist: the model has layers 0-1"):
        build_strategy("adapter", {"layers": "2"}).apply(adapted_model := tiny_t5(), task_for_model(adapted_model))


@pytest.mark.parametrize("model_name", ["tiny-bert", "tiny-llama"])
@pytest.mark.parametrize("variant", ["houlsby", "pfeiffer", "parallel"])
def test_zero_up_init_leaves_logits_unchanged_and_bert_init_changes_them(model_name, variant):
    tokenizer = load_tokenizer(resolve_model(model_name))
    before = logits(base_model(model_name).eval(), tokenizer)
    assert torch.equal(logits(adapted(model_name, variant=variant, init="zero-up"), tokenizer), before)
    assert not torch.allclose(logits(adapted(model_name, variant=variant, init="bert"), tokenizer), before)


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_t5])
def test_zero_up_init_leaves_gpt2_and_t5_unchanged(make):
    before = token_logits(make())
    base = make()
    adapted_model = build_strategy("adapter", {"variant": "houlsby", "init": "zero-up"}).apply(base, task_for_model(base))
    assert torch.equal(token_logits(adapted_model), before)


def bottleneck(adapter, v: torch.Tensor, scaling: float) -> torch.Tensor:
    """A(v) written out from the adapter's weights: scaling * up(act(down(v))), no dropout (eval)."""
    return scaling * F.linear(adapter.act(F.linear(v, adapter.down.weight, adapter.down.bias)),
                              adapter.up.weight, adapter.up.bias)


def reference_bert_logits(model, input_ids: torch.Tensor, variant: str, scaling: float) -> torch.Tensor:
    """A tiny BERT's logits with adapters placed by hand as the papers place them (eval mode,
    so dropout is the identity; `.forward` calls bypass the strategy's hooks):
    houlsby  LN(x + h + A(h)) after both sub-layers, h taken after the sub-layer's dropout;
    pfeiffer LN(x + h + A(LN(x + h))) after the feed-forward sub-layer, the same LayerNorm twice;
    parallel LN(x + h + A(x)) beside the feed-forward sub-layer."""
    hidden = model.bert.embeddings(input_ids=input_ids)
    for layer in model.bert.encoder.layer:
        attention = layer.attention
        h = attention.output.dropout.forward(attention.output.dense.forward(attention.self(hidden)[0]))
        if variant == "houlsby":
            h = h + bottleneck(layer.adapter_attention, h, scaling)
        x = attention.output.LayerNorm.forward(h + hidden)
        out = layer.output
        h = out.dropout.forward(out.dense.forward(layer.intermediate.forward(x)))
        if variant == "houlsby":
            hidden = out.LayerNorm.forward(x + h + bottleneck(layer.adapter_ffn, h, scaling))
        elif variant == "pfeiffer":
            hidden = out.LayerNorm.forward(x + h + bottleneck(layer.adapter_ffn, out.LayerNorm.forward(x + h), scaling))
        else:
            hidden = out.LayerNorm.forward(x + h + bottleneck(layer.adapter_ffn, x, scaling))
    return model.classifier(model.bert.pooler(hidden))


@pytest.mark.parametrize("variant", ["houlsby", "pfeiffer", "parallel"])
def test_each_variant_matches_the_published_design_on_bert(variant):
    model = adapted("tiny-bert", variant=variant, init="bert", scaling=0.5)
    input_ids = torch.tensor([[2, 15, 27, 33, 3], [2, 41, 8, 19, 3]])
    with torch.no_grad():
        for name, param in model.named_parameters():  # adapters that matter: A(v) of order 1, not 1e-3
            if ".adapter_" in name:
                param.mul_(20)
        expected = reference_bert_logits(model, input_ids, variant, scaling=0.5)
        assert torch.allclose(model(input_ids=input_ids).logits, expected, atol=1e-6)
        # and the adapters matter: without them, or with another scaling, logits (about 0.01) move 100x the tolerance
        for other in (0.0, 1.0):
            assert (reference_bert_logits(model, input_ids, variant, scaling=other) - expected).abs().max() > 1e-4


def test_houlsby_adds_after_the_hidden_dropout_in_training():
    # Houlsby's code: h = dropout(dense(a)); h = h + A(h); LN(h + x). The dropout must not drop A(h).
    model = adapted("tiny-bert", variant="houlsby", init="bert").train()
    layer = model.bert.encoder.layer[0]
    a, x = torch.randn(2, 3, H), torch.randn(2, 3, H)
    with torch.no_grad():
        torch.manual_seed(7)
        out = layer.attention.output(a, x)
        torch.manual_seed(7)
        h = layer.attention.output.dropout.forward(layer.attention.output.dense.forward(a))
        expected = layer.attention.output.LayerNorm.forward(h + bottleneck(layer.adapter_attention, h, 1.0) + x)
        assert torch.allclose(out, expected, atol=1e-6)


@pytest.mark.parametrize("variant", ["houlsby", "pfeiffer", "parallel"])
def test_each_variant_on_a_pre_ln_decoder(variant):
    # Llama has no norm after its residuals: the feed-forward sub-layer adds h = mlp(norm(x))
    # to the stream x, and the adapter reads h (houlsby), x + h (pfeiffer) or x (parallel).
    base = base_model("tiny-llama").model.layers[0]
    layer = adapted("tiny-llama", variant=variant, init="bert", scaling=0.5).model.layers[0]
    x = torch.randn(2, 3, H)
    with torch.no_grad():
        h = base.mlp(base.post_attention_layernorm(x))
        mlp = layer.mlp(layer.post_attention_layernorm(x))  # the norm's pre-hook captures x
        source = {"houlsby": h, "pfeiffer": x + h, "parallel": x}[variant]
        assert torch.allclose(mlp, h + bottleneck(layer.adapter_ffn, source, 0.5), atol=1e-6)
        o_base, o = base.self_attn.o_proj(x), layer.self_attn.o_proj(x)
        if variant == "houlsby":
            assert torch.allclose(o, o_base + bottleneck(layer.adapter_attention, o_base, 0.5), atol=1e-6)
        else:
            assert torch.equal(o, o_base)


def test_variants_default_to_their_published_settings():
    houlsby, pfeiffer, parallel = (build_strategy("adapter", {"variant": v}) for v in ("houlsby", "pfeiffer", "parallel"))
    assert (houlsby.reduction_factor, houlsby.non_linearity, houlsby.scaling, houlsby.init) == (16, "silu", 1.0, "houlsby")
    assert (pfeiffer.reduction_factor, pfeiffer.non_linearity, pfeiffer.scaling, pfeiffer.init) == (16, "relu", 1.0, "bert")
    assert (parallel.reduction_factor, parallel.non_linearity, parallel.scaling, parallel.init) == (2, "relu", 4.0, "zero-up")
    assert build_strategy("adapter", {"variant": "parallel", "scaling": 1.0}).scaling == 1.0


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


def tiny_distilbert():
    return tiny_from_config(DistilBertConfig(dim=H, hidden_dim=128, n_layers=L, n_heads=2, vocab_size=100))


@pytest.mark.parametrize("variant", ["houlsby", "pfeiffer", "parallel"])
def test_each_variant_on_distilbert(variant):
    # DistilBERT is post-LN: its feed-forward sub-layer gives LN(x + h), h = ffn(x) after its
    # dropout; its attention output projection has no dropout after it, so houlsby reads out_lin.
    base, model = tiny_distilbert(), build_strategy("adapter", {"variant": variant, "init": "bert", "scaling": 0.5})
    model = model.apply(adapted_model := tiny_distilbert(), task_for_model(adapted_model))
    expected = {n: p.numel() for n, p in model.named_parameters() if n.startswith(("pre_classifier.", "classifier."))}
    for i in range(L):
        for name in WHERE[variant]:
            expected |= adapter_params(f"distilbert.transformer.layer.{i}.{name}", bottleneck=DEFAULT_BOTTLENECK[variant])
    assert trainable(model) == expected
    plain, layer, x = base.distilbert.transformer.layer[0], model.distilbert.transformer.layer[0], torch.randn(2, 3, H)
    with torch.no_grad():
        h = plain.ffn(x)
        norm = plain.output_layer_norm
        if variant == "houlsby":
            reference = norm(x + h + bottleneck(layer.adapter_ffn, h, 0.5))
        elif variant == "pfeiffer":
            reference = norm(x + h + bottleneck(layer.adapter_ffn, norm(x + h), 0.5))
        else:
            reference = norm(x + h + bottleneck(layer.adapter_ffn, x, 0.5))
        assert torch.allclose(layer.output_layer_norm(layer.ffn(x) + x), reference, atol=1e-6)
        if variant == "houlsby":
            o = plain.attention.out_lin(x)
            assert torch.allclose(layer.attention.out_lin(x), o + bottleneck(layer.adapter_attention, o, 0.5), atol=1e-6)


def test_unmapped_architecture_names_what_it_looked_for():
    model = tiny_from_config(BartConfig(d_model=H, encoder_layers=L, decoder_layers=L, encoder_attention_heads=2,
                                        decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128,
                                        vocab_size=100, max_position_embeddings=64))
    message = r"BartForSequenceClassification.*looked for.*attention\.output\.dropout"
    with pytest.raises(PeftkitError, match=message):
        build_strategy("adapter", {}).apply(model, TASKS["classification"])


def test_4bit_base_gets_float32_adapters_that_learn():
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                      bnb_4bit_compute_dtype=torch.float32)
    model = build_strategy("adapter", {"init": "bert"}).apply(adapted_model := base_model("tiny-llama", quantization), task_for_model(adapted_model))
    layer = model.model.layers[0]
    assert type(layer.mlp.down_proj.weight).__name__ == "Params4bit"
    assert {p.dtype for p in layer.adapter_ffn.parameters()} == {torch.float32}
    assert trainable(model) == expectation("tiny-llama", "pfeiffer")
    batch = load_tokenizer(resolve_model("tiny-llama"))(SENTENCES, padding=True, return_tensors="pt")
    model(**batch, labels=torch.tensor([0, 1])).loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if ".adapter_" in n}
    assert len(grads) == 8 and all(g is not None and g.abs().sum() > 0 for g in grads.values())


def test_train_save_reload_gives_identical_results(tmp_path, data_dir):
    result = peftkit.train({
        "model": "tiny-bert", "task": "sst2", "data_dir": data_dir, "max_train_samples": 64, "max_eval_samples": 48,
        "epochs": 1, "batch_size": 16, "strategy": {"name": "adapter", "variant": "houlsby"},
        "output_dir": tmp_path / "run",
    })
    assert result.record.trainable_params == sum(expectation("tiny-bert", "houlsby").values())
    _, model, tokenizer, _ = load_run(result.output_dir)
    _, again, _, _ = load_run(result.output_dir)
    assert torch.equal(logits(model.eval(), tokenizer), logits(again.eval(), tokenizer))
    assert not torch.equal(model.bert.encoder.layer[0].adapter_ffn.up.weight, torch.zeros(H, H // 16))
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
    model = build_strategy("adapter", {"init": "zero-up"}).apply(adapted_model := load_for_classification(source, ["neg", "pos"], tokenizer), task_for_model(adapted_model))
    model.eval()
    assert count_parameters(model)[0] == 6 * (384 * 24 + 24 + 24 * 384 + 384) + 770
    assert torch.equal(logits(model, tokenizer), before)
