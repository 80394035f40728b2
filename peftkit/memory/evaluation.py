"""The per-epoch evaluation's forward pass without gradients, in its own (larger) batch: what
one layer holds at its peak, inside the feed-forward block. That is the layer's input, the
residual stream and the normalised input, the feed-forward intermediates (two; three for gated
MLPs, whose layers hold one more hidden-size buffer), and beside them an unmerged adapter's
update of the up projection (LoRA: one more; DoRA: up to five more). Without dropout,
attention runs in a fused kernel that never stores the scores (the eager implementation
does). No key/value cache (classifiers are loaded with `use_cache=False`), except the one
prefix tuning passes its prefixes in: every layer's keys and values.

Training's activations are freed before it runs, and the output layer's evaluation loss runs
after the layers, so only the largest of those counts (`peftkit.memory.estimate.Estimate`).
"""

from __future__ import annotations

from typing import Any

from torch import nn

from peftkit.anatomy import inspect_model, unwrap_peft
from peftkit.memory.activations import gated, lora_drops_out, rebuilds_delta_weight
from peftkit.memory.generation import prefix_cache_values
from peftkit.memory.sizes import model_sizes, virtual_tokens


def evaluation_bytes(model: nn.Module, config: Any, strategy: Any, batch_size: int, seq_len: int,
                     bytes_per_value: int) -> int:
    """The most one layer holds at once in a forward pass without gradients (see the module
    docstring; checked per strategy by benchmarks/evaluation_peak.py, docs/estimate.md)."""
    length, keys = seq_len + virtual_tokens(strategy), seq_len + virtual_tokens(strategy, "keys")
    h, heads, _, _, intermediate = model_sizes(config)
    is_gated = gated(inspect_model(unwrap_peft(model)))
    per_token = layer_peak_values(h, intermediate, is_gated, feed_forward_outputs_at_once(model, intermediate))
    if getattr(config, "_attn_implementation", None) == "eager":  # scores and probabilities, stored
        per_token += 2 * heads * keys
    return int(batch_size * (length * per_token + prefix_cache_values(config, strategy, keys)) * bytes_per_value)


def layer_peak_values(h: int, intermediate: int, gated: bool, up_outputs: int = 1) -> int:
    """Values per token one layer holds at its no-gradient peak, inside the feed-forward block:
    the layer's input, the residual stream and the normalised input (gated MLPs: one more
    hidden-size buffer), and the widest of the feed-forward's stages. Plain: the up projection's
    output and its activation (gated: the activated gate, the up projection and their product).
    An up projection holding `up_outputs` feed-forward-wide tensors at once (an unmerged
    adapter's update beside its base output, `feed_forward_outputs_at_once`) holds them beside
    the activated gate when the MLP is gated."""
    if gated:
        return max(3, 1 + up_outputs) * intermediate + 4 * h
    return max(2, up_outputs) * intermediate + 3 * h


def feed_forward_outputs_at_once(model: nn.Module, intermediate: int) -> int:
    """The most feed-forward-wide tensors one of the model's up (or gate) projections, those
    `intermediate` wide, holds at once in a forward pass without gradients, read from PEFT's
    forward code: a plain projection its output (1); an unmerged LoRA-style update computed
    out of place (LoRA, QLoRA, LoHa, LoKr) the base output, the update and their sum (3); DoRA
    the base output, the LoRA output and its scaled copy, the base output recomputed when
    dropout is on, the rescaled base output and their sum (6;
    peft.tuners.lora.dora.DoraLinearLayer.forward)."""
    from peft.tuners.lora import LoraLayer  # peft imports transformers: kept out of start-up

    most = 1
    for module in model.modules():
        base = getattr(module, "base_layer", None)
        if getattr(base, "out_features", None) != intermediate:
            continue
        if getattr(module, "lora_magnitude_vector", None):
            most = max(most, 6 if lora_drops_out(module) else 5)
        elif isinstance(module, LoraLayer) or rebuilds_delta_weight(module):
            most = max(most, 3)
    return most
