"""The PEFT strategies beyond LoRA (ia3, prompt learning, `peft:<method>`): exactly which
parameters train on a tiny BERT, a tiny Llama and a tiny T5, with the counts worked out by hand
from the architectures (hidden 64, intermediate 128, 2 layers; Llama k/v projections 64 -> 32),
identical logits after a save and reload, and clear errors for what cannot work."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

import peftkit
from peftkit.tasks import task_for_model
from peftkit.cli import app
from peftkit.errors import PeftkitError
from peftkit.measure import count_parameters
from peftkit.loading import load_run
from peftkit.strategies import STRATEGIES, build_strategy, load_peft_registry
from test_strategies import ARCH, L, load, trainable

R = 8  # default rank of loha and lokr
V = 20  # default number of virtual tokens
HEAD = {"tiny-bert": {"classifier.weight": 128, "classifier.bias": 2}, "tiny-llama": {"score.weight": 128}}
KV_WIDTH = {"tiny-bert": 64, "tiny-llama": 32}  # per layer, what one key (or value) vector holds
# PEFT's lokr factorization(n): the divisor pair (a <= b) of n closest to sqrt(n).
FACTORS = {32: (4, 8), 64: (8, 8), 128: (8, 16)}


def per_linear(model_name: str, params) -> dict[str, int]:
    """Expected trainable tensors of a method that adapts every layer projection, plus the
    head (PEFT's modules_to_save copy). `params(d_in, d_out)` -> {tensor name: numel}."""
    arch = ARCH[model_name]
    expected = {
        f"base_model.model.{arch['layers']}.{layer}.{path}.{name}": n
        for layer in range(L)
        for path, (d_in, d_out) in arch["linears"].items()
        for name, n in params(d_in, d_out).items()
    }
    return expected | head(model_name, "base_model.model")


def head(model_name: str, prefix: str) -> dict[str, int]:
    return {f"{prefix}.{n.replace('.', '.modules_to_save.default.')}": c for n, c in HEAD[model_name].items()}


def loha(d_in: int, d_out: int) -> dict[str, int]:
    # two rank-R products (out x R)(R x in), combined by a Hadamard product
    return {"hada_w1_a.default": d_out * R, "hada_w1_b.default": R * d_in,
            "hada_w2_a.default": d_out * R, "hada_w2_b.default": R * d_in}


def lokr(d_in: int, d_out: int) -> dict[str, int]:
    # W = w1 (kron) w2 with out = a_o*b_o, in = a_i*b_i; both factors full, as R >= max(b_o, b_i) / 2
    (a_o, b_o), (a_i, b_i) = FACTORS[d_out], FACTORS[d_in]
    return {"lokr_w1.default": a_o * a_i, "lokr_w2.default": b_o * b_i}


def vera(d_in: int, d_out: int) -> dict[str, int]:
    # shared frozen random A (256 x in) and B (out x 256); trained scaling vectors b (out) and d (256)
    return {"vera_lambda_b.default": d_out, "vera_lambda_d.default": 256}


def oft(d_in: int, d_out: int) -> dict[str, int]:
    # block-diagonal rotation of the input: in/32 blocks, each a skew-symmetric 32x32 (32*31/2 = 496 free values)
    return {"oft_R.default.weight": d_in // 32 * 496}


@pytest.mark.parametrize("model_name", ["tiny-bert", "tiny-llama"])
@pytest.mark.parametrize("strategy,params,total", [
    # bert: 4 attention 64x64 -> 16*128 each, intermediate/output 16*192 each, so 14336 per layer, + head 130
    # llama: q,o 16*128; k,v 16*96; gate, up, down 16*192, so 16384 per layer, + head 128
    ("peft:loha", loha, {"tiny-bert": 2 * 14336 + 130, "tiny-llama": 2 * 16384 + 128}),
    # bert: 4 x (64+64) + 2 x (64+128) = 896 per layer; llama: q,o 128, k,v 32+64, gate, up, down 192 -> 1024
    ("peft:lokr", lokr, {"tiny-bert": 2 * 896 + 130, "tiny-llama": 2 * 1024 + 128}),
    # bert: 6 x 256 + (4*64 + 128 + 64) = 1984 per layer; llama: 7 x 256 + (64+32+32+64+128+128+64) = 2304
    ("peft:vera", vera, {"tiny-bert": 2 * 1984 + 130, "tiny-llama": 2 * 2304 + 128}),
    # bert: 5 projections with in=64 (2 blocks, 992) + output.dense in=128 (1984) = 6944; llama: 6 x 992 + 1984 = 7936
    ("peft:oft", oft, {"tiny-bert": 2 * 6944 + 130, "tiny-llama": 2 * 7936 + 128}),
])
def test_peft_methods_adapt_every_projection_and_train_the_head(model_name, strategy, params, total):
    model = load(model_name, strategy)
    assert trainable(model) == per_linear(model_name, params)
    assert count_parameters(model)[0] == total[model_name]


@pytest.mark.parametrize("model_name,sites,total", [
    # key and value vectors (64 each) rescale their outputs; the FFN output projection's vector (128)
    # rescales its input. attention.output.dense is not an FFN output: 2 x 256 + head 130
    ("tiny-bert", {"attention.self.key": 64, "attention.self.value": 64, "output.dense": 128}, 2 * 256 + 130),
    # k, v outputs are 2 KV heads of 16 = 32; down_proj's input is the intermediate 128: 2 x 192 + head 128
    ("tiny-llama", {"self_attn.k_proj": 32, "self_attn.v_proj": 32, "mlp.down_proj": 128}, 2 * 192 + 128),
])
def test_ia3_scales_keys_values_and_the_ffn_output(model_name, sites, total):
    model = load(model_name, "ia3")
    layers = ARCH[model_name]["layers"]
    expected = {f"base_model.model.{layers}.{i}.{path}.ia3_l.default": n for i in range(L) for path, n in sites.items()}
    assert trainable(model) == expected | head(model_name, "base_model.model")
    assert count_parameters(model)[0] == total


def linear_layers(widths: list[int]) -> dict[str, int]:
    """mlp_head.{0,2,4,...} of an MLP with these widths (ReLU between the linears)."""
    return {f"mlp_head.{2 * i}.{p}": n for i, (a, b) in enumerate(zip(widths, widths[1:]))
            for p, n in (("weight", a * b), ("bias", b))}


def lstm_layer(layer: int, d_in: int, hidden: int) -> dict[str, int]:
    """One bidirectional LSTM layer: 4 gates of `hidden` rows each, per direction."""
    return {f"lstm_head.{p}_l{layer}{d}": n for d in ("", "_reverse")
            for p, n in (("weight_ih", 4 * hidden * d_in), ("weight_hh", 4 * hidden * hidden),
                         ("bias_ih", 4 * hidden), ("bias_hh", 4 * hidden))}


@pytest.mark.parametrize("model_name", ["tiny-bert", "tiny-llama"])
@pytest.mark.parametrize("strategy,options,prompt_encoder", [
    # 20 virtual tokens of width 64
    ("prompt-tuning", {}, {"embedding.weight": V * 64}),
    ("prompt-tuning", {"init": "sample-vocab", "num_virtual_tokens": 5}, {"embedding.weight": 5 * 64}),
    ("prompt-tuning", {"init": "text", "init_text": "is this review positive ?"}, {"embedding.weight": V * 64}),
    # the embeddings, then an MLP 64 -> 64 -> 64 -> 64
    ("p-tuning", {}, {"embedding.weight": V * 64, **linear_layers([64, 64, 64, 64])}),
    # the embeddings, a 2-layer bidirectional LSTM of width 16 (layer 1 reads both directions: 32),
    # then an MLP 32 -> 32 -> 64
    ("p-tuning", {"encoder": "lstm", "encoder_hidden_size": 16},
     {"embedding.weight": V * 64, **lstm_layer(0, 64, 16), **lstm_layer(1, 32, 16), **linear_layers([32, 32, 64])}),
])
def test_prompt_learning_trains_the_prompt_and_the_head(model_name, strategy, options, prompt_encoder):
    model = load(model_name, strategy, **options)
    expected = {f"prompt_encoder.default.{n}": c for n, c in prompt_encoder.items()}
    assert trainable(model) == expected | head(model_name, "base_model")


@pytest.mark.parametrize("model_name", ["tiny-bert", "tiny-llama"])
def test_prefix_tuning_parameters(model_name):
    # one key and one value vector per virtual token and layer: 20 x 2 layers x 2 x width
    model = load(model_name, "prefix-tuning")
    expected = {"prompt_encoder.default.embedding.weight": V * L * 2 * KV_WIDTH[model_name]}
    assert trainable(model) == expected | head(model_name, "base_model")
    # with projection: 20 tokens of width 64 through 64 -> 32 -> (2 layers x 2 x 64)
    projected = trainable(load("tiny-bert", "prefix-tuning", projection=True, encoder_hidden_size=32))
    assert projected == {"prompt_encoder.default.embedding.weight": V * 64,
                         "prompt_encoder.default.transform.0.weight": 64 * 32, "prompt_encoder.default.transform.0.bias": 32,
                         "prompt_encoder.default.transform.2.weight": 32 * 256, "prompt_encoder.default.transform.2.bias": 256,
                         } | head("tiny-bert", "base_model")


def test_ln_tuning_auto_trains_the_layer_norms():
    names = trainable(load("tiny-llama", "peft:ln_tuning"))
    stem = "base_model.model.model.layers"
    assert names == {f"{stem}.{i}.{norm}.ln_tuning_layers.default.weight": 64
                     for i in range(L) for norm in ("input_layernorm", "post_attention_layernorm")} | head("tiny-llama", "base_model.model")


@pytest.fixture
def tiny_t5():
    from transformers import AutoModelForSequenceClassification, T5Config

    config = T5Config(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4, num_labels=2,
                      pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    torch.manual_seed(0)
    return lambda: AutoModelForSequenceClassification.from_config(config)


T5_HEAD = {"classification_head.modules_to_save.default.dense.weight": 64 * 64, "classification_head.modules_to_save.default.dense.bias": 64,
           "classification_head.modules_to_save.default.out_proj.weight": 2 * 64, "classification_head.modules_to_save.default.out_proj.bias": 2}


def test_ia3_and_loha_on_t5(tiny_t5):
    # Layer paths come from both stacks' blocks: the encoder's (self-attention layer.0, FFN
    # layer.1) and the decoder's (self-attention layer.0, cross-attention layer.1, FFN layer.2).
    # ia3 rescales the feed-forward output it finds last (the decoder's FFN).
    stem = "base_model.model.transformer"
    ia3 = build_strategy("ia3").apply(adapted_model := tiny_t5(), task_for_model(adapted_model))
    kv = {f"{stack}.block.{i}.layer.{sub}.{kind}.{p}.ia3_l.default": 64 for i in range(2) for p in "kv"
          for stack, sub, kind in (("encoder", 0, "SelfAttention"), ("decoder", 0, "SelfAttention"), ("decoder", 1, "EncDecAttention"))}
    ffn = {f"decoder.block.{i}.layer.2.DenseReluDense.wo.ia3_l.default": 128 for i in range(2)}
    expected = {f"{stem}.{n}": c for n, c in (kv | ffn).items()} | {f"base_model.model.{n}": c for n, c in T5_HEAD.items()}
    assert trainable(ia3) == expected
    assert count_parameters(ia3)[0] == 2 * (6 * 64 + 128) + 4290  # head: 64x64+64 dense, 64x2+2 out_proj

    # loha: 8 attention projections per decoder block and 4 per encoder block (64x64: 16*128 = 2048
    # each), both stacks' FFNs (64x128, 128x64: 16*192 = 3072 each)
    loha_model = build_strategy("peft:loha").apply(adapted_model := tiny_t5(), task_for_model(adapted_model))
    assert count_parameters(loha_model)[0] == 2 * (4 * 2048 + 2 * 3072) + 2 * (8 * 2048 + 2 * 3072) + 4290


@pytest.mark.parametrize("strategy", ["prompt-tuning", "p-tuning", "prefix-tuning"])
def test_prompt_learning_rejects_encoder_decoder_classifiers(tiny_t5, strategy):
    with pytest.raises(PeftkitError, match=f"{strategy} cannot train a t5 classifier: encoder-decoder"):
        build_strategy(strategy).check(tiny_t5().config)


RELOADED = ["ia3", "prompt-tuning", "p-tuning", "prefix-tuning", "peft:loha", "peft:lokr", "peft:vera", "peft:oft", "peft:ln_tuning"]


def train(tmp_path, data_dir, strategy, model="tiny-bert"):
    return peftkit.train({"model": model, "task": "sst2", "data_dir": data_dir, "max_train_samples": 64,
                          "max_eval_samples": 48, "epochs": 1, "batch_size": 16, "strategy": strategy,
                          "output_dir": tmp_path / strategy.replace(":", "-")}).output_dir


def logits(model, tokenizer, texts=("a gripping , funny film", "dull and far too long , a slog")):
    with torch.no_grad():
        return model(**tokenizer(list(texts), padding=True, return_tensors="pt")).logits


@pytest.mark.slow
@pytest.mark.parametrize("strategy", RELOADED)
def test_reloading_a_run_gives_identical_logits(tmp_path, data_dir, strategy):
    run = train(tmp_path, data_dir, strategy)
    _, first, tokenizer, _ = load_run(run)
    assert torch.equal(logits(first, tokenizer), logits(load_run(run)[1], tokenizer))


@pytest.mark.slow
@pytest.mark.parametrize("model", ["tiny-bert", "tiny-llama"])
def test_prefix_tuning_trains_and_padding_does_not_leak(tmp_path, data_dir, model):
    """The prefixes reach every attention layer through the key/value cache, and the attention
    mask is lengthened to cover them: an example scores the same alone and padded in a batch."""
    run = peftkit.train({"model": model, "task": "sst2", "data_dir": data_dir, "max_train_samples": 64,
                         "max_eval_samples": 48, "epochs": 1, "batch_size": 16, "strategy": "prefix-tuning",
                         "learning_rate": 0.05, "output_dir": tmp_path / "prefix"}).output_dir
    _, trained, tokenizer, record = load_run(run)
    both = logits(trained, tokenizer, ("a gripping , funny film that never lets go", "dull"))
    alone = logits(trained, tokenizer, ("dull",))
    assert torch.allclose(both[1], alone[0], atol=1e-5)
    fresh = build_strategy("prefix-tuning").apply(adapted_model := load_run(run)[1].get_base_model(), task_for_model(adapted_model))
    assert not torch.allclose(logits(fresh, tokenizer), logits(trained, tokenizer))  # the trained prefix matters
    assert record.trainable_params > 0


def test_prompt_tuning_on_a_decoder_pads_left_so_the_last_token_is_read(tmp_path, data_dir):
    # Given embeddings (not input_ids) a decoder classifier cannot find the last real token and
    # reads the last position: right padding would make it read a pad token (measured 0.55 off here).
    run = train(tmp_path, data_dir, "prompt-tuning", model="tiny-llama")
    _, model, tokenizer, _ = load_run(run)
    assert tokenizer.padding_side == "left"
    texts = ["a gripping , funny film", "dull and far too long , really , truly a slog"]
    one_by_one = torch.cat([logits(model, tokenizer, [t]) for t in texts])
    # what remains is the virtual tokens' distance to the text moving with the padding (RoPE): ~1e-3
    assert (logits(model, tokenizer, texts) - one_by_one).abs().max() < 1e-2


def test_default_learning_rates():
    load_peft_registry()
    lrs = {name: STRATEGIES[name].default_lr for name in ("lora", "ia3", "prompt-tuning", "prefix-tuning", "p-tuning", "peft:loha")}
    assert lrs == {"lora": 1e-3, "ia3": 3e-3, "prompt-tuning": 3e-2, "prefix-tuning": 1e-2, "p-tuning": 1e-3, "peft:loha": 1e-3}


def test_strategies_command_lists_every_method():
    result = CliRunner().invoke(app, ["strategies", "--all-peft"])
    assert result.exit_code == 0, result.output
    listed = {line.split("│")[1].strip() for line in result.output.splitlines() if line.count("│") > 2}
    assert {"full", "partial", "linear-probe", "bitfit", "lora", "dora", "qlora", "ia3", "prompt-tuning",
            "prefix-tuning", "p-tuning", "peft:loha", "peft:lokr", "peft:vera", "peft:oft"} <= listed


def test_unknown_peft_option_lists_the_valid_ones():
    with pytest.raises(PeftkitError, match=r"'peft:loha' has no option 'alpah' \(did you mean 'alpha'\?\); "
                                           r"valid options: rank_pattern, alpha_pattern, r, alpha, .*target_modules"):
        build_strategy("peft:loha", {"alpah": 4})
    with pytest.raises(PeftkitError, match="option 'r'"):
        build_strategy("peft:loha", {"r": "big"})


def test_peft_options_reach_the_peft_config():
    model = load("tiny-bert", "peft:loha", r=2, target_modules=["query", "value"])
    # 2 projections x 2 layers, 2 * 2 * (64 + 64) each, + head
    assert count_parameters(model)[0] == 4 * 2 * 2 * 128 + 130


@pytest.mark.parametrize("strategy,options,message", [
    ("peft:adalora", {}, "cannot train here: AdaLoRA reallocates ranks"),
    ("peft:poly", {}, "needs a task id with every example"),
    ("prompt-tuning", {"init": "text"}, "init_text together with init=text"),
    ("prompt-tuning", {"num_virtual_tokens": 0}, "num_virtual_tokens >= 1"),
])
def test_methods_that_cannot_work_fail_when_built(strategy, options, message):
    with pytest.raises(PeftkitError, match=message):
        build_strategy(strategy, options)


@pytest.mark.parametrize("strategy,message", [
    ("peft:xlora", "no modules_to_save, so the new task head would stay at its random initialization"),
    ("peft:cpt", "CPTConfig only supports task_type = CAUSAL_LM"),
])
def test_methods_that_cannot_train_a_classifier_are_refused_by_the_task(strategy, message):
    from peftkit.tasks import TASKS

    with pytest.raises(PeftkitError, match=message):
        TASKS["classification"].check_strategy(build_strategy(strategy, {"num_virtual_tokens": 4} if "cpt" in strategy else {}))


def test_peft_refusing_the_model_is_one_line():
    # c3a's default block (256) does not divide the tiny projections (64)
    with pytest.raises(PeftkitError, match="^peft:c3a: The block size should be a factor of the input size"):
        load("tiny-bert", "peft:c3a")
