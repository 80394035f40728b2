"""The analytic memory estimate, term by term, against hand computations on tiny BERT
(vocab 30522, hidden 64, 2 layers, 2 heads of 32, FFN 128, 2 labels) and Llama-3-8B."""

from __future__ import annotations

from pathlib import Path

import pytest

from peftkit.errors import PeftkitError
from peftkit.estimate import CPU_RUNTIME_BYTES, GB, estimate

LLAMA3_8B = str(Path(__file__).parent / "configs" / "llama-3-8b.json")
# embeddings 30522*64 + 512*64 + 2*64 + LayerNorm 128; per layer 4*(64*64+64) + 128 + (64*128+128)
# + (128*64+64) + 128 = 33,472; pooler 64*64+64; classifier 64*2+2
TOTAL = 30522 * 64 + 512 * 64 + 2 * 64 + 128 + 2 * 33_472 + 4_160 + 130
LORA = 2 * 7_168 + 130  # see tests/test_strategies.py
PER_LAYER_TOKEN = (64 + 6 * 32 + 64) + 2 * 64 + (64 + 2 * 128)  # attention, norms, feed-forward = 768


def cpu(strategy, **kw):
    return estimate("tiny-bert", strategy, batch_size=2, seq_len=10, dtype="fp32", device="cpu", **kw)


def test_full_weights_gradients_optimizer_snapshot():
    terms = cpu("full").terms
    assert terms["weights"] == 4 * TOTAL
    assert terms["gradients"] == 4 * TOTAL
    assert terms["optimizer"] == 8 * TOTAL          # AdamW: two fp32 states
    assert terms["best_weights"] == 4 * TOTAL
    assert terms["runtime"] == CPU_RUNTIME_BYTES


def test_optimizer_variants():
    assert cpu("full", optimizer="adamw-8bit").terms["optimizer"] == 2 * TOTAL
    assert cpu("full", optimizer="paged-adamw-8bit").terms["optimizer"] == 2 * TOTAL
    assert cpu("full", optimizer="sgd").terms["optimizer"] == 0


def test_qlora_weights_are_4bit_with_double_quantized_constants():
    quantized = 2 * (4 * 64 * 64 + 64 * 128 + 128 * 64) + 64 * 64  # layer projections and pooler
    blocks = quantized / 64
    four_bit = quantized / 2 + blocks + blocks / 256 * 4
    frozen_fp32 = 4 * (TOTAL - quantized)                 # embeddings, norms, biases, original head
    trainable = 4 * LORA                                  # adapters and PEFT's head copy
    result = cpu("qlora")
    assert result.terms["weights"] == int(four_bit + frozen_fp32 + trainable)
    assert result.trainable_params == LORA
    assert result.terms["gradients"] == 4 * LORA


def test_run_level_quantization_packs_the_base_under_any_adding_strategy():
    plain, packed = cpu("adapter"), cpu("adapter", quantization="nf4")
    assert packed.terms["weights"] < plain.terms["weights"]
    assert packed.trainable_params == plain.trainable_params
    with pytest.raises(PeftkitError, match="trains the base weights"):
        cpu("full", quantization="nf4")


def test_activations_full_and_checkpointed():
    tokens, layers, h = 2 * 10, 2, 64
    masks = tokens * layers * 2 * h                       # two hidden-dropout masks, a byte each
    assert cpu("full").terms["activations"] == 4 * (tokens * layers * PER_LAYER_TOKEN + tokens * h) + masks
    checkpointed = 4 * (tokens * (layers * h + PER_LAYER_TOKEN) + tokens * h) + masks
    assert cpu("full", gradient_checkpointing=True).terms["activations"] == checkpointed


def test_activations_follow_what_needs_gradients():
    assert cpu("linear-probe").terms["activations"] == 4 * 2 * 64   # the head's input only
    top_layer = 4 * (20 * PER_LAYER_TOKEN + 20 * 64) + 20 * 2 * 64
    assert cpu("partial").terms["activations"] > top_layer            # default trains the top 2 = all layers
    from peftkit.strategies import build_strategy

    one = estimate("tiny-bert", build_strategy("partial", {"trainable_layers": 1}), batch_size=2, seq_len=10,
                   dtype="fp32", device="cpu")
    assert one.terms["activations"] == top_layer


def test_lora_adds_rank_outputs_and_dropped_out_inputs():
    # per layer: r=8 outputs for 6 projections; dropout copies of their inputs (5 of width 64, one of 128)
    extra = 6 * 8 + (5 * 64 + 128)
    tokens, layers = 20, 2
    base = cpu("full").terms["activations"]
    assert cpu("lora").terms["activations"] == base + 4 * tokens * layers * extra


def test_llama3_8b_qlora_fits_24gb_and_full_does_not_fit_80gb():
    qlora = estimate(LLAMA3_8B, "qlora")
    assert qlora.fits(24) and not qlora.fits(16)
    full = estimate(LLAMA3_8B, "full")
    assert not full.fits(80)
    assert full.total_params == qlora.total_params - qlora.trainable_params  # less adapters and head copy
    assert 7.4e9 < full.total_params < 7.6e9


def test_bad_inputs():
    with pytest.raises(PeftkitError, match="unknown dtype"):
        estimate("tiny-bert", "full", dtype="fp8")
    with pytest.raises(PeftkitError, match="unknown optimizer"):
        estimate("tiny-bert", "full", optimizer="adam9")
    with pytest.raises(PeftkitError, match="does not exist"):
        estimate("missing/config.json", "full")
    assert GB == 2**30
