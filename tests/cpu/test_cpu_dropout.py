"""CPU dropout from numpy's generator (peftkit.cpu.dropout): still dropout (rate, scale,
expectation, gradient), decided by torch's seed and RNG state, and installed in place of every
plain `nn.Dropout` of a model (a PEFT model's LoRA dropout included, hooks kept) by a run on CPU."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from transformers import BertConfig, BertForSequenceClassification

from peftkit.cpu.dropout import CpuDropout, keep_mask, use_cpu_dropout


@pytest.mark.parametrize("p", [0.05, 0.1, 0.5, 0.9])
def test_mask_drops_at_rate_p_and_scales_the_rest(p):
    torch.manual_seed(0)
    mask = keep_mask((1000, 1000), p)
    dropped = (mask == 0).float().mean().item()
    assert abs(dropped - p) < 5 * (p * (1 - p) / 1e6) ** 0.5  # five standard deviations
    assert torch.all((mask == 0) | (mask == torch.tensor(1 / (1 - p), dtype=torch.float32)))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("p", [0.05, 0.1, 0.3])
def test_a_half_precision_mask_is_the_fp32_mask_in_that_dtype(p, dtype):
    """bf16/fp16 masks are built from the scale's bit pattern, not converted from fp32: the same
    values, drawn from the same words."""
    torch.manual_seed(0)
    half = keep_mask((37, 129), p, dtype)
    torch.manual_seed(0)
    full = keep_mask((37, 129), p)
    assert half.dtype == dtype and half.shape == (37, 129)
    assert torch.equal(half, full.to(dtype))
    assert torch.equal(half.unique(), torch.tensor([0, 1 / (1 - p)], dtype=dtype))


def test_masks_follow_torchs_seed_and_rng_state():
    torch.manual_seed(3)
    first = keep_mask((64, 33), 0.3)
    state = torch.get_rng_state()
    second = keep_mask((64, 33), 0.3)
    torch.manual_seed(3)
    assert torch.equal(keep_mask((64, 33), 0.3), first)  # the same seed, the same mask
    torch.set_rng_state(state)
    assert torch.equal(keep_mask((64, 33), 0.3), second)  # a restored state (a resumed checkpoint) continues the stream
    assert not torch.equal(first, second)


def test_layer_keeps_the_expectation_and_its_gradient_is_the_mask():
    layer = CpuDropout(0.2).train()
    x = torch.full((200, 500), 2.0, requires_grad=True)
    torch.manual_seed(0)
    y = layer(x)
    assert y.mean().item() == pytest.approx(2.0, rel=0.01)
    y.sum().backward()
    assert torch.equal(x.grad, y.detach() / 2.0)  # d(x * mask)/dx = mask


def test_layer_is_torchs_dropout_in_eval_at_zero_and_one_and_in_bf16():
    x = torch.randn(8, 16)
    assert torch.equal(CpuDropout(0.5).eval()(x), x)
    assert torch.equal(CpuDropout(0.0).train()(x), x)
    assert torch.equal(CpuDropout(1.0).train()(x), torch.zeros_like(x))
    half = CpuDropout(0.5).train()(x.bfloat16())
    assert half.dtype == torch.bfloat16 and 0 < (half == 0).float().mean() < 1


@pytest.mark.parametrize("p", [1e-6, 1 - 1e-6])
def test_rates_16_bits_cannot_resolve_are_torchs_dropout(p, monkeypatch):
    import peftkit.cpu.dropout

    def refuse(*args):
        raise AssertionError("keep_mask called")

    monkeypatch.setattr(peftkit.cpu.dropout, "keep_mask", refuse)
    x = torch.ones(100, 100)
    torch.manual_seed(0)
    ours = CpuDropout(p).train()(x)
    torch.manual_seed(0)
    assert torch.equal(ours, nn.Dropout(p).train()(x))  # torch's mask for the same seed
    with pytest.raises(AssertionError, match="keep_mask called"):
        CpuDropout(0.5).train()(x)


def test_inplace_layer_changes_its_input():
    x = torch.ones(100, 100)
    torch.manual_seed(0)
    out = CpuDropout(0.5, inplace=True).train()(x)
    assert out.data_ptr() == x.data_ptr() and (x == 0).any()


def test_every_plain_dropout_of_a_model_and_its_lora_is_replaced():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=50)
    model = get_peft_model(BertForSequenceClassification(config),
                           LoraConfig(task_type="SEQ_CLS", r=2, lora_dropout=0.1, target_modules=["query", "value"]))
    model.add_module("other", nn.Dropout1d(0.3))
    seen = []
    model.base_model.model.bert.embeddings.dropout.register_forward_hook(lambda *args: seen.append(1))
    plain = sum(type(m) is nn.Dropout for m in model.modules())
    ids = torch.randint(0, 50, (3, 7))
    before = model.eval()(input_ids=ids).logits
    # embeddings 1, per layer 3 (attention probabilities, attention output, feed-forward output), classifier 1, LoRA 2 per layer
    assert use_cpu_dropout(model) == plain == 1 + 3 * 2 + 1 + 2 * 2
    assert not any(type(m) is nn.Dropout for m in model.modules())
    assert type(model.other) is nn.Dropout1d
    assert torch.equal(model.eval()(input_ids=ids).logits, before)
    assert len(seen) == 2  # the same layer objects: a strategy's hooks on them still run
    lora = model.base_model.model.bert.encoder.layer[0].attention.self.query.lora_dropout["default"]
    assert isinstance(lora, CpuDropout) and lora.p == 0.1
    model.train()
    torch.manual_seed(1)
    first = model(input_ids=ids).logits
    torch.manual_seed(1)
    assert torch.equal(model(input_ids=ids).logits, first)  # seeded training forwards repeat exactly
