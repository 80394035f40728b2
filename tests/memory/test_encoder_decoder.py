"""The estimate of an encoder-decoder (T5, BART): its two layer stacks against the bytes autograd
really keeps, the output layer's vocabulary-size logits per target token, generation's cache
per beam, and a run's estimate read at its longest targets."""

from __future__ import annotations

import pytest
import torch

from peftkit.anatomy import encoder_decoder_stacks
from peftkit.memory.encoder_decoder import lowest_layer_needing_grad
from peftkit.memory.estimate import estimate
from peftkit.measure import saved_for_backward
from peftkit.models import load_tokenizer, random_checkpoint, resolve_model
from peftkit.strategies import build_strategy
from peftkit.tasks import resolve_task

FLAN_T5_SMALL = "tests/configs/flan-t5-small.json"  # its real config: 8+8 layers, gated GELU, 32,128 words
BART = dict(model_type="bart", d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=128, decoder_ffn_dim=128, max_position_embeddings=128)


def _model(name: str) -> str:
    return str(random_checkpoint("test-bart", BART)) if name == "bart" else name


@pytest.mark.parametrize(("model", "strategy"), [
    ("tiny-t5", strategy) for strategy in ("full", "lora", "adapter", "partial", "prompt-tuning", "ia3")
] + [("bart", "full"), ("bart", "lora")])
def test_activation_term_matches_what_autograd_saves(model, strategy):
    """One training forward over 4 x 24 source and 4 x 10 target tokens: the bytes autograd keeps,
    less the cross-entropy's log-probabilities (the task's output-layer term), against the
    activation term."""
    task = resolve_task("seq2seq")[0]
    built = build_strategy(strategy)
    source = resolve_model(_model(model))
    torch.manual_seed(0)
    net = built.apply(task.load_model(source, {}, load_tokenizer(source)), task).train()
    batch, source_len, target_len = 4, 24, 10
    ids, labels = torch.randint(10, 200, (batch, source_len)), torch.randint(10, 200, (batch, target_len))
    log_probabilities = batch * target_len * net.config.vocab_size * 4
    measured = saved_for_backward(net, lambda: net(input_ids=ids, attention_mask=torch.ones_like(ids),
                                                   labels=labels)) - log_probabilities
    predicted = estimate(_model(model), built, batch_size=batch, seq_len=source_len, dtype="fp32", device="cpu",
                         task="seq2seq", answer_tokens=target_len).terms["activations"]
    assert 0.85 < predicted / measured < 1.15, (predicted, measured)


def test_the_two_stacks_are_read_in_encoder_then_decoder_order():
    from peftkit.memory.meta import load_config, meta_model

    config = load_config(FLAN_T5_SMALL)
    task = resolve_task("seq2seq")[0]
    encoder, decoder = encoder_decoder_stacks(meta_model(config, build_strategy("full"), task))
    assert (encoder.prefix, encoder.layers, decoder.prefix, decoder.layers) == ("encoder.block", 8, "decoder.block", 8)
    full = meta_model(config, build_strategy("full"), task)
    assert lowest_layer_needing_grad(full, encoder, decoder, ()) == 0  # the shared embeddings sit below layer 0
    # adapters go into both stacks: backward reaches the encoder's first layer
    adapter = meta_model(config, build_strategy("adapter"), task)
    assert lowest_layer_needing_grad(adapter, encoder, decoder, ()) == 0
    # partial trains the decoder's top two layers: nothing of the encoder is kept for backward
    partial = meta_model(config, build_strategy("partial"), task)
    assert lowest_layer_needing_grad(partial, encoder, decoder, ()) == 14


def test_output_layer_and_generation_count_the_vocabulary_per_target_token_and_the_cache_per_beam():
    vocab = 32128
    short = estimate(FLAN_T5_SMALL, "lora", batch_size=8, seq_len=256, dtype="fp32", task="seq2seq", answer_tokens=32)
    long = estimate(FLAN_T5_SMALL, "lora", batch_size=8, seq_len=256, dtype="fp32", task="seq2seq", answer_tokens=64)
    # fp32 logits' log-probabilities kept for backward, their gradient and the logits' gradient
    assert short.terms["output_layer"] == 8 * 32 * vocab * 12
    assert long.terms["activations"] > short.terms["activations"]
    assert short.settings["num_beams"] == 1
    one, four = (estimate(FLAN_T5_SMALL, "lora", batch_size=8, seq_len=256, dtype="fp32", task="seq2seq",
                          answer_tokens=32, eval_answer_tokens=32, eval_batch_size=64, max_new_tokens=128,
                          num_beams=beams)
                 for beams in (1, 4))
    # per beam: the encoder output (512 per source token) and 8 decoder layers' keys and values
    # (2 x 6 heads x 64) over source and generated tokens, fp32
    cache = 64 * (256 * 512 + 8 * 2 * 6 * 64 * (256 + 128)) * 4
    assert four.terms["evaluation_output"] == 4 * cache > one.terms["evaluation_output"]


def test_a_runs_estimate_reads_its_longest_targets(jsonl, tmp_path):
    """Before a run the target is as long as max_target_length may make it; the run records its
    longest targets, and the estimate reads them."""
    from peftkit.resolve import make_config
    from peftkit.tasks import load_data
    from peftkit.memory.estimate import estimate_run

    rows = [{"text": "one two three four five six", "summary": "one"}] * 8
    config = make_config({"model": "tiny-t5", "task": "seq2seq", "strategy": "lora", "batch_size": 4,
                          "train_file": str(jsonl("t.jsonl", rows)), "validation_file": str(jsonl("v.jsonl", rows)),
                          "source_column": "text", "target_column": "summary", "max_target_length": 48})
    task = config.task_kind
    source = resolve_model("tiny-t5")
    prepared = task.prepare(load_data(config), load_tokenizer(source), config)
    longest = task.longest_answers(prepared, config)
    assert longest == {"longest_train_answer": 3, "longest_eval_answer": 3}  # [CLS] one [SEP]: tiny T5 reads MiniLM's words
    before, after = estimate_run(config, {"device": "cpu"}), estimate_run(config, {"data": longest, "device": "cpu"})
    assert after.terms["output_layer"] * 16 == before.terms["output_layer"]  # 3 target positions, not 48
