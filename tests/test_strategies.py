"""For every strategy, on a tiny BERT and a tiny Llama: exactly which parameters require
grad, and how many. Expected names and counts are written out by hand from the tiny
architectures (hidden 64, intermediate 128, 2 layers; Llama with 2 KV heads of 16)."""

from __future__ import annotations

import pytest
import torch

from peftkit.errors import PeftkitError
from peftkit.measure import count_parameters
from peftkit.models import load_for_classification, load_tokenizer, resolve_model
from peftkit.resolve import apply_strategy
from peftkit.strategies import STRATEGIES, build_strategy
from peftkit.tasks import TASKS

H, I, L = 64, 128, 2
BERT_LINEARS = {  # path inside a layer: (in, out)
    "attention.self.query": (H, H), "attention.self.key": (H, H), "attention.self.value": (H, H),
    "attention.output.dense": (H, H), "intermediate.dense": (H, I), "output.dense": (I, H),
}
LLAMA_LINEARS = {
    "self_attn.q_proj": (H, H), "self_attn.k_proj": (H, 32), "self_attn.v_proj": (H, 32),
    "self_attn.o_proj": (H, H), "mlp.gate_proj": (H, I), "mlp.up_proj": (H, I), "mlp.down_proj": (I, H),
}
ARCH = {
    "tiny-bert": dict(layers="bert.encoder.layer", linears=BERT_LINEARS, head={"classifier.weight": 2 * H, "classifier.bias": 2}),
    "tiny-llama": dict(layers="model.layers", linears=LLAMA_LINEARS, head={"score.weight": 2 * H}),
}


def load(model_name: str, strategy: str, **options):
    strategy_obj = build_strategy(strategy, options)
    source = resolve_model(model_name)
    tokenizer = load_tokenizer(source)
    torch.manual_seed(0)
    model = load_for_classification(source, ["neg", "pos"], tokenizer, strategy_obj.quantization_config(torch.float32))
    return strategy_obj.apply(model, TASKS["classification"])


def trainable(model) -> dict[str, int]:
    return {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}


def lora_expectation(model_name: str, r: int = 8, dora: bool = False) -> dict[str, int]:
    arch = ARCH[model_name]
    expected = {}
    for layer in range(L):
        for path, (d_in, d_out) in arch["linears"].items():
            stem = f"base_model.model.{arch['layers']}.{layer}.{path}"
            expected[f"{stem}.lora_A.default.weight"] = r * d_in
            expected[f"{stem}.lora_B.default.weight"] = d_out * r
            if dora:
                expected[f"{stem}.lora_magnitude_vector.default.weight"] = d_out
    for name, n in arch["head"].items():
        module, leaf = name.split(".")
        expected[f"base_model.model.{module}.modules_to_save.default.{leaf}"] = n
    return expected


@pytest.mark.parametrize("model_name", ["tiny-bert", "tiny-llama"])
@pytest.mark.parametrize("strategy,dora", [("lora", False), ("dora", True), ("qlora", False)])
def test_lora_family_trains_adapters_on_every_projection_and_the_head(model_name, strategy, dora):
    model = load(model_name, strategy)
    expected = lora_expectation(model_name, dora=dora)
    assert trainable(model) == expected
    assert count_parameters(model)[0] == sum(expected.values())


def test_lora_counts_match_hand_arithmetic():
    # tiny-bert: per layer 4*8*(64+64) + 8*(64+128) + 8*(128+64) = 7168; 2 layers + head 130
    assert sum(lora_expectation("tiny-bert").values()) == 2 * 7168 + 130
    # tiny-llama: q,o 8*128; k,v 8*96; gate,up,down 8*192 -> 8192 per layer; head 128
    assert sum(lora_expectation("tiny-llama").values()) == 2 * 8192 + 128


def test_qlora_base_is_4bit_and_counted_unpacked():
    model = load("tiny-bert", "qlora")
    query = model.base_model.model.bert.encoder.layer[0].attention.self.query.base_layer
    assert type(query.weight).__name__ == "Params4bit"
    full_total = count_parameters(load("tiny-bert", "full"))[1]
    # base (4-bit weights counted as 2 values per stored byte) + adapters + PEFT's trainable head copy
    assert count_parameters(model)[1] == full_total + sum(lora_expectation("tiny-bert").values())


def test_full_trains_everything():
    model = load("tiny-bert", "full")
    names = trainable(model)
    assert names == {n: p.numel() for n, p in model.named_parameters()}
    assert "bert.embeddings.word_embeddings.weight" in names


@pytest.mark.parametrize("model_name", ["tiny-bert", "tiny-llama"])
def test_linear_probe_trains_only_the_head(model_name):
    assert trainable(load(model_name, "linear-probe")) == ARCH[model_name]["head"]


def test_bitfit_trains_biases_and_head_bert():
    names = trainable(load("tiny-bert", "bitfit"))
    per_layer = {
        "attention.self.query.bias": H, "attention.self.key.bias": H, "attention.self.value.bias": H,
        "attention.output.dense.bias": H, "attention.output.LayerNorm.bias": H,
        "intermediate.dense.bias": I, "output.dense.bias": H, "output.LayerNorm.bias": H,
    }
    expected = {f"bert.encoder.layer.{i}.{k}": v for i in range(L) for k, v in per_layer.items()}
    expected |= {"bert.embeddings.LayerNorm.bias": H, "bert.pooler.dense.bias": H, **ARCH["tiny-bert"]["head"]}
    assert names == expected
    assert sum(names.values()) == 1410


def test_bitfit_on_llama_refuses_because_only_the_head_would_train():
    with pytest.raises(PeftkitError, match="bitfit: LlamaForSequenceClassification has no bias terms.*linear-probe"):
        load("tiny-llama", "bitfit")


@pytest.mark.parametrize(("strategy", "marker"), [("dora", "lora_magnitude_vector"), ("ia3", "ia3_l")])
def test_scales_neutral_at_one_take_no_weight_decay(strategy, marker):
    # decay pulls toward 0; a DoRA magnitude or IA3 vector is "unchanged" at 1, so it must not decay
    model = load("tiny-bert", strategy)
    named = {id(p): n for n, p in model.named_parameters()}
    groups = build_strategy(strategy).param_groups(model, lr=0.1, weight_decay=0.01)
    decayed = {named[id(p)] for g in groups if g["weight_decay"] > 0 for p in g["params"]}
    undecayed = {named[id(p)] for g in groups if g["weight_decay"] == 0 for p in g["params"]}
    assert any(marker in n for n in undecayed) and not any(marker in n for n in decayed)
    assert any("classifier" in n and n.endswith("weight") for n in decayed)


def test_dora_refuses_use_dora_false():
    with pytest.raises(PeftkitError, match="pick --strategy lora"):
        build_strategy("dora", {"use_dora": False})


def test_partial_top_layer_bert():
    names = trainable(load("tiny-bert", "partial", trainable_layers=1))
    assert {n for n in names if ".layer." in n} == {
        n for n, _ in load("tiny-bert", "full").named_parameters() if n.startswith("bert.encoder.layer.1.")
    }
    assert {n for n in names if ".layer." not in n} == {
        "bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight", "classifier.bias"
    }
    # layer: 4 attention linears 4*(64*64+64), 2 LayerNorms 2*128, FFN (64*128+128)+(128*64+64); pooler 64*64+64; head 130
    assert sum(names.values()) == 4 * (H * H + H) + 2 * 2 * H + (H * I + I) + (I * H + H) + (H * H + H) + 130


def test_partial_top_layer_llama():
    names = trainable(load("tiny-llama", "partial", trainable_layers=1))
    layer1 = {n for n in names if n.startswith("model.layers.1.")}
    assert {n for n in names} - layer1 == {"model.norm.weight", "score.weight"}
    assert not any(n.startswith("model.layers.0.") for n in names)
    # q,o 64*64; k,v 64*32; gate, up, down 64*128; 2 RMSNorms of 64; final norm 64; score 128
    assert sum(names.values()) == 2 * H * H + 2 * H * 32 + 3 * H * I + 2 * H + H + 128


def test_partial_explicit_range_and_embeddings():
    names = trainable(load("tiny-bert", "partial", layers="0", train_embeddings=True))
    assert any(n.startswith("bert.encoder.layer.0.") for n in names)
    assert not any(n.startswith("bert.encoder.layer.1.") for n in names)
    assert "bert.embeddings.word_embeddings.weight" in names


def test_partial_rejects_layers_the_model_lacks():
    with pytest.raises(PeftkitError, match="do not exist"):
        load("tiny-bert", "partial", layers="0-5")


def test_layerwise_lr_decay_and_head_lr():
    model = load("tiny-bert", "full", layer_lr_decay=0.5, head_lr=1.0)
    strategy = build_strategy("full", {"layer_lr_decay": 0.5, "head_lr": 1.0})
    lr_of = {}
    for group in strategy.param_groups(model, lr=0.1, weight_decay=0.01):
        for param in group["params"]:
            lr_of[id(param)] = group["lr"]
    named = dict(model.named_parameters())
    assert lr_of[id(named["classifier.weight"])] == 1.0
    assert lr_of[id(named["bert.encoder.layer.1.output.dense.weight"])] == pytest.approx(0.1)
    assert lr_of[id(named["bert.encoder.layer.0.output.dense.weight"])] == pytest.approx(0.05)
    assert lr_of[id(named["bert.embeddings.word_embeddings.weight"])] == pytest.approx(0.025)


def test_registry_has_the_core_strategies():
    assert {"full", "partial", "linear-probe", "bitfit", "lora", "dora", "qlora"} <= set(STRATEGIES)


def test_unknown_strategy_suggests_the_closest_name():
    with pytest.raises(PeftkitError, match="did you mean 'lora'"):
        build_strategy("lorra")


def test_unknown_option_lists_valid_ones():
    with pytest.raises(PeftkitError, match="no option 'rank'.*valid options: r, alpha"):
        build_strategy("lora", {"rank": 4})


def test_wrong_option_type_is_reported():
    with pytest.raises(PeftkitError, match="option 'r'"):
        build_strategy("lora", {"r": "big"})


def test_python_api_apply_strategy():
    source = resolve_model("tiny-bert")
    model = load_for_classification(source, ["a", "b"], load_tokenizer(source))
    adapted = apply_strategy(model, "lora", r=4, target_modules=["query", "value"])
    assert count_parameters(adapted)[0] == 2 * 2 * 4 * (H + H) + 130
