"""Key/value caches: every layer's keys and values for every token, as generation keeps them
and as prefix tuning hands its prefixes to the model. Torch-free: a task imports it at start-up."""

from __future__ import annotations

from typing import Any

from peftkit.memory.sizes import model_sizes


def kv_cache_bytes(config: Any, batch_size: int, seq_len: int, bytes_per_value: int) -> int:
    """Generation's key/value cache: every layer's keys and values for every token."""
    _, _, head_dim, kv, _ = model_sizes(config)
    return int(config.num_hidden_layers * 2 * kv * head_dim * batch_size * seq_len * bytes_per_value)


def prefix_cache_values(config: Any, strategy: Any, keys: int) -> int:
    """Prefix tuning hands its prefixes to the model as a key/value cache, which every layer
    extends with its own keys and values and which lives to the end of the forward pass:
    per example, every layer's keys and values over prefix and input (values, not bytes)."""
    if getattr(strategy, "virtual_tokens_enter", "input") != "keys":
        return 0
    _, _, head_dim, kv, _ = model_sizes(config)
    return config.num_hidden_layers * 2 * kv * head_dim * keys
