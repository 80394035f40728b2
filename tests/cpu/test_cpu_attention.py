"""SDPA in fp32 on CPU under bf16 autocast (peftkit.cpu.attention): the same attention as
transformers' sdpa given fp32 inputs, masks honoured, gradients back in the callers' dtype; a
run switches to it only where it applies, and the estimate counts the fp32 tensors it keeps."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from peftkit.tasks import TASKS
from peftkit.cpu.attention import FP32_SDPA, can_use_fp32_cpu_attention, fp32_sdpa_attention, use_fp32_cpu_attention
from peftkit.models import load_for_classification, load_tokenizer, resolve_model


class _Module(nn.Module):
    num_key_value_groups = 2  # grouped-query attention: 2 query heads per key/value head
    is_causal = False


def test_equals_sdpa_on_fp32_inputs_under_autocast_and_returns_the_callers_dtype():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    torch.manual_seed(0)
    q = torch.randn(2, 4, 7, 16, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(2, 2, 7, 16, dtype=torch.bfloat16, requires_grad=True) for _ in range(2))
    mask = torch.ones(2, 1, 7, 7, dtype=torch.bool)
    mask[1, :, :, 5:] = False  # the second example's last two keys are padding
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = fp32_sdpa_attention(_Module(), q, k, v, mask, scaling=0.25, dropout=0.0)
    reference, _ = sdpa_attention_forward(_Module(), q.float(), k.float(), v.float(), mask, scaling=0.25, dropout=0.0)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, reference.to(torch.bfloat16))  # computed in fp32: autocast did not cast it back down
    with torch.autocast("cpu", dtype=torch.bfloat16):
        plain, _ = sdpa_attention_forward(_Module(), q, k, v, mask, scaling=0.25, dropout=0.0)
    assert plain.dtype == torch.bfloat16 and not torch.equal(out, plain)  # bf16 SDPA rounds differently
    out.float().sum().backward()
    assert q.grad.dtype == k.grad.dtype == torch.bfloat16 and q.grad.abs().sum() > 0


def test_float_masks_and_fp32_inputs_pass_through():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    q, k, v = (torch.randn(1, 2, 5, 8) for _ in range(3))
    additive = torch.zeros(1, 1, 5, 5, dtype=torch.bfloat16)
    additive[..., 3:] = torch.finfo(torch.bfloat16).min  # a bf16 additive mask stays masking in fp32
    module = _Module()
    module.num_key_value_groups = 1
    half, _ = fp32_sdpa_attention(module, q.bfloat16(), k.bfloat16(), v.bfloat16(), additive)
    masked, _ = sdpa_attention_forward(module, q, k[:, :, :3], v[:, :, :3], None)
    assert torch.allclose(half.float(), masked, atol=2e-2)
    same, _ = fp32_sdpa_attention(module, q, k, v, None)
    assert torch.equal(same, sdpa_attention_forward(module, q, k, v, None)[0])


@pytest.mark.parametrize("model", ["tiny-bert", "tiny-llama"])
def test_a_switched_model_reads_a_padded_batch_as_sdpa_does(model, monkeypatch):
    from transformers import AttentionInterface

    """Bidirectional BERT and causal Llama, bf16 weights under bf16 autocast, a batch whose
    second row is padded on the left: the switched model's last hidden states follow plain
    sdpa's, and the padded row's real tokens read as they do unpadded, so the padding mask
    reaches the new attention."""
    source = resolve_model(model)
    tokenizer = load_tokenizer(source)
    plain = load_for_classification(source, ["a", "b"], tokenizer, dtype=torch.bfloat16).eval()
    switched = load_for_classification(source, ["a", "b"], tokenizer, dtype=torch.bfloat16).eval()
    assert can_use_fp32_cpu_attention(switched) and use_fp32_cpu_attention(switched)
    assert switched.config._attn_implementation == FP32_SDPA and plain.config._attn_implementation == "sdpa"
    torch.manual_seed(0)
    ids = torch.randint(10, 200, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)  # the real tokens at 0, 1, ... as when alone

    def last_hidden(net, *rows):
        return net(input_ids=rows[0], attention_mask=rows[1], position_ids=rows[2],
                   output_hidden_states=True).hidden_states[-1].float()

    masks = []

    def spy(module, query, key, value, attention_mask, **kwargs):
        masks.append(attention_mask)
        return fp32_sdpa_attention(module, query, key, value, attention_mask, **kwargs)

    monkeypatch.setitem(AttentionInterface._global_mapping, FP32_SDPA, spy)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = (last_hidden(net, ids, mask, positions) for net in (switched, plain))
        alone = last_hidden(switched, ids[1:, 4:], mask[1:, 4:], positions[1:, 4:])
    scale = theirs.abs().max()
    assert (ours - theirs).abs().max() < 0.05 * scale
    assert (ours[1, 4:] - alone[0]).abs().max() < 0.05 * scale
    padded = masks[0]  # the padded batch's, as transformers' sdpa mask function builds it: no key of padding
    assert padded is not None and padded.dtype == torch.bool and not padded[1, ..., :4].any()


def test_eager_models_keep_their_attention():
    source = resolve_model("tiny-bert")
    eager = load_for_classification(source, ["a", "b"], load_tokenizer(source), attn_implementation="eager")
    assert not can_use_fp32_cpu_attention(eager) and not use_fp32_cpu_attention(eager)
    assert eager.config._attn_implementation == "eager"


@pytest.mark.parametrize(("options", "switched"), [
    ({"dtype": "bf16"}, True),
    ({"dtype": "fp32", "precision": "bf16"}, True),  # fp32 weights, bf16 activations
    ({"dtype": "fp32"}, False),
    ({"dtype": "bf16", "attn_implementation": "sdpa"}, False),  # sdpa asked for by name: its own precision
])
def test_runs_switch_only_under_half_precision_with_attention_auto(tmp_path, options, switched):
    from peftkit.resolve import make_config
    from peftkit.loading import load_base
    from peftkit.tasks import resolve_task

    config = make_config({"model": "tiny-bert", "task": "sst2", "strategy": "lora", "output_dir": str(tmp_path),
                          **options})
    source = resolve_model("tiny-bert")
    model = load_base(config, resolve_task("classification")[0], source, {"label_names": ["a", "b"]},
                      load_tokenizer(source), None)
    assert (model.config._attn_implementation == FP32_SDPA) is switched


@pytest.mark.parametrize(("model", "strategy"), [("tiny-bert", "full"), ("tiny-bert", "lora"),
                                                 ("tiny-llama", "full"), ("tiny-llama", "lora")])
def test_activation_term_adds_what_the_fp32_attention_keeps(model, strategy):
    """Under bf16 on CPU, what autograd keeps for one training forward grows, from plain sdpa to
    the switched model, by what the estimate adds for attention auto over sdpa: the fp32 q, k,
    v and output on Llama's fused kernel; nothing on BERT, whose attention dropout takes SDPA's
    math path, which computes in fp32 anyway."""
    from peftkit.memory.estimate import estimate
    from peftkit.measure import saved_for_backward
    from peftkit.models import keep_trainable_fp32, load_model_config
    from peftkit.strategies import build_strategy

    def measured(switch: bool) -> int:
        built = build_strategy(strategy)
        source = resolve_model(model)
        tokenizer = load_tokenizer(source)
        built.prepare_tokenizer(tokenizer, load_model_config(source))
        torch.manual_seed(0)
        net = keep_trainable_fp32(built.apply(load_for_classification(source, ["a", "b"], tokenizer,
                                                                      dtype=torch.bfloat16),
                                              TASKS["classification"])).train()
        assert not switch or use_fp32_cpu_attention(net)
        ids = torch.randint(10, 200, (4, 24))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return saved_for_backward(net, lambda: net(input_ids=ids, attention_mask=torch.ones_like(ids),
                                                       labels=torch.zeros(4, dtype=torch.long)))

    def estimated(attention: str) -> int:
        return estimate(model, strategy, batch_size=4, seq_len=24, dtype="bf16", device="cpu",
                        attn_implementation=attention).terms["activations"]

    grown, counted = measured(True) - measured(False), estimated("auto") - estimated("sdpa")
    if model == "tiny-bert":
        assert grown == counted == 0
    elif strategy == "lora":
        assert grown > 0 and abs(counted / grown - 1) < 0.1, (counted, grown)
    else:  # a trained output projection kept plain sdpa's output itself as its input; now a bf16 copy of it
        assert 0 < counted <= grown, (counted, grown)
