"""Attention computed in fp32 on CPU when the run computes in bf16 or fp16. torch's CPU
scaled-dot-product attention is several times slower in bf16 than in fp32, backward most of
all: on this 2-core AMD EPYC (AVX512-BF16) one SmolLM2-135M attention call of 16 x 9 heads x
16 tokens x 64 took 28.4 ms forward and backward in bf16 against 5.2 ms in fp32 (40 tokens:
62.9 against 29.9 ms), and in a SmolLM2 LoRA step SDPA's backward was 15% of the time. The
projections around it stay in bf16, where oneDNN's matrix products are fast.

`FP32_SDPA` is transformers' own `sdpa` attention (same masks, same kernel, same GQA handling)
given fp32 queries, keys, values and float masks, its output cast back to the dtype plain sdpa
returns; registered under its own name in transformers' attention and mask registries, so a
model switches to it with `set_attn_implementation` and switches back the same way. Autograd
keeps the fp32 copies SDPA reads for backward: twice the bytes of bf16 ones, which
`peftkit.memory` counts. SDPA's math path, which CPU training takes under attention dropout
(BERT, MiniLM), computes in fp32 already: there the switch changes nothing."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

FP32_SDPA = "sdpa_fp32_on_cpu"  # the name holds "sdpa": transformers then checks the model can run sdpa


def fp32_sdpa_attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                        attention_mask: torch.Tensor | None, **kwargs: Any) -> tuple[torch.Tensor, Any]:
    """transformers' `sdpa_attention_forward` computed in fp32 outside autocast, its output in
    the dtype plain sdpa would return: autocast's (inputs may be fp32 there: full training's
    rotary embeddings promote q and k), else the queries'. fp32 inputs outside autocast, and
    tensors off the CPU, pass through unchanged."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    autocast = torch.is_autocast_enabled("cpu")
    dtype = torch.get_autocast_dtype("cpu") if autocast else query.dtype
    if dtype == torch.float32 or query.device.type != "cpu":
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    kwargs = {name: _fp32(value) for name, value in kwargs.items()}  # a float position bias (T5)
    with torch.autocast("cpu", enabled=False):
        output, weights = sdpa_attention_forward(module, query.float(), key.float(), value.float(),
                                                 _fp32(attention_mask), **kwargs)
    return output.to(dtype), weights


def _fp32(value: Any) -> Any:
    """A floating-point tensor in fp32 (an additive mask's -inf and dtype minimum stay masking);
    anything else (a bool mask, None, a flag) as it is."""
    return value.float() if isinstance(value, torch.Tensor) and value.is_floating_point() else value


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(FP32_SDPA, fp32_sdpa_attention)
    AttentionMaskInterface.register(FP32_SDPA, sdpa_mask)  # without a mask function no padding mask is built


def can_use_fp32_cpu_attention(model: nn.Module) -> bool:
    """Whether `use_fp32_cpu_attention` would switch `model`: its transformers model runs `sdpa`
    through transformers' attention registry (one that runs eager, flash or its own attention
    code keeps it)."""
    base = _transformers_model(model)
    return base is not None and getattr(base.config, "_attn_implementation", None) == "sdpa" \
        and base._can_set_attn_implementation()


def use_fp32_cpu_attention(model: nn.Module) -> bool:
    """Switches `model` (a transformers model, or one a PEFT or pooling wrapper holds) from
    `sdpa` to `FP32_SDPA`, in place, where `can_use_fp32_cpu_attention`. Returns whether it did."""
    if not can_use_fp32_cpu_attention(model):
        return False
    _register()
    base = _transformers_model(model)
    base.set_attn_implementation(FP32_SDPA)
    return base.config._attn_implementation == FP32_SDPA


def _transformers_model(model: nn.Module) -> Any:
    """The outermost transformers model in `model` (itself, or the one a wrapper holds)."""
    from transformers import PreTrainedModel

    return next((m for m in model.modules() if isinstance(m, PreTrainedModel)), None)
