"""A model's dimensions from its config, bytes per value, and the virtual tokens a strategy
adds: plain arithmetic, torch-free, read by every other term and by the tasks' output layers."""

from __future__ import annotations

from typing import Any

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def model_sizes(config: Any) -> tuple[int, int, int, int, int]:
    """(hidden size, attention heads, head dim, key/value heads, feed-forward width), under
    each family's names (T5: d_kv, d_ff; BART: encoder_ffn_dim)."""
    h = config.hidden_size
    heads = config.num_attention_heads
    width = next((w for w in (getattr(config, name, None) for name in ("intermediate_size", "d_ff", "encoder_ffn_dim"))
                  if w), 4 * h)
    return (h, heads, getattr(config, "head_dim", None) or getattr(config, "d_kv", None) or h // heads,
            getattr(config, "num_key_value_heads", None) or heads, width)


def virtual_tokens(strategy: Any, where: str = "input") -> int:
    """Virtual tokens the strategy adds to the input sequence, or (`where="keys"`) to the keys:
    prompt tuning lengthens both, prefix tuning only the keys and values."""
    count = int(getattr(strategy, "num_virtual_tokens", 0) or 0)
    return count if where == "keys" or getattr(strategy, "virtual_tokens_enter", "input") == "input" else 0
