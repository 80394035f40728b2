"""The activation and evaluation terms of an encoder-decoder (T5, BART): two layer stacks,
read as one sequence of layers (the encoder's, then the decoder's), where each encoder layer
works on the source tokens and each decoder layer on the target tokens, attending to them
(causally) and, through cross-attention, to every source token.

Per decoder layer, cross-attention keeps for backward what self-attention keeps per target
token (its norm's input, the queries, the attention probabilities over the source with their
dropout mask on the math path, its projections' inputs when they train, one more dropout mask),
and per source token its keys and values; the encoder's output, the input of every decoder
layer's key and value projections, is kept once when those train. A strategy's own tensors and
the switch to only counting layers from the lowest one that needs gradients follow
`peftkit.memory.activations`, layer by layer in that order (so a strategy that trains only the
decoder keeps nothing of the encoder). The output layer (the vocabulary-size logits and their
loss) is the task's (`tasks.seq2seq`), and `answer_tokens` there are the target tokens.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from peftkit.anatomy import Stack, encoder_decoder_stacks, inspect_model, is_under, unwrap_peft
from peftkit.memory.activations import (layer_saved_bytes, lowest_trained_place, projections_train_under,
                                        strategy_extra_bytes, trains_only_after_feed_forward, weight_sized_bytes)
from peftkit.memory.evaluation import feed_forward_outputs_at_once, layer_peak_values
from peftkit.memory.sizes import model_sizes, virtual_tokens


def _positions(model: nn.Module, encoder: Stack, decoder: Stack) -> dict[str, int]:
    """Each base parameter's place in the sequence of layers (encoder 0.., then decoder): a
    layer's own parameters its index; anything between layers (embeddings, the encoder's final
    norm) the next layer's, since everything above it must keep its activations for its
    gradient; what follows the last layer (the decoder's final norm) the last layer's."""
    last = encoder.layers + decoder.layers - 1
    places: dict[str, int] = {}
    pending: list[str] = []
    for name, _ in unwrap_peft(model).named_parameters():
        index = _layer_of(name, encoder, decoder)
        if index is None:
            pending.append(name)
            continue
        for waiting in pending:
            places[waiting] = index
        pending = []
        places[name] = index
    places.update({name: last for name in pending})
    return places


def _layer_of(name: str, encoder: Stack, decoder: Stack) -> int | None:
    for offset, stack in ((0, encoder), (encoder.layers, decoder)):
        if name.startswith(stack.prefix + "."):
            return offset + int(name[len(stack.prefix) + 1:].split(".")[0])
    return None


def lowest_layer_needing_grad(model: nn.Module, encoder: Stack, decoder: Stack, head: tuple[str, ...]) -> int | None:
    """The lowest layer (in encoder-then-decoder order) whose activations backward needs, or
    None when only the output layer trains. Trainable tensors outside the base model (virtual
    tokens) enter at the encoder's input."""
    places = _positions(model, encoder, decoder)
    return lowest_trained_place(model, lambda name: places.get(name, 0), lambda name: is_under(name, head))


def activation_bytes(model: nn.Module, config: Any, strategy: Any, batch_size: int, source_len: int, target_len: int,
                     bytes_per_value: int, gradient_checkpointing: bool, device: str,
                     attention_bytes: int | None = None) -> int:
    """Tensors saved for backward over one batch of `source_len` source and `target_len` target
    tokens (see the module docstring)."""
    encoder, decoder = encoder_decoder_stacks(model)
    head = inspect_model(unwrap_peft(model)).head_modules
    lowest = lowest_layer_needing_grad(model, encoder, decoder, head)
    h, _, head_dim, kv, _ = model_sizes(config)
    source = source_len + virtual_tokens(strategy)
    source_keys, target_keys = source_len + virtual_tokens(strategy, "keys"), target_len + virtual_tokens(strategy, "keys")
    if lowest is None:  # only the output layer trains: it keeps its input, the decoder's last hidden states
        return int(batch_size * target_len * h * bytes_per_value)
    mask_bytes = bytes_per_value if device == "cpu" else 1
    gated = bool(getattr(config, "is_gated_act", False))
    layers, inputs = [], 0
    for index in range(lowest, encoder.layers + decoder.layers):
        in_encoder = index < encoder.layers
        stack, local = (encoder, index) if in_encoder else (decoder, index - encoder.layers)
        prefix = stack.layer_prefix(local)
        tokens = batch_size * (source if in_encoder else target_len)
        extra = strategy_extra_bytes(model, prefix, bytes_per_value, mask_bytes)
        if index == lowest and trains_only_after_feed_forward(model, prefix):  # the adapter's input, and what it feeds
            layers.append(tokens * (extra + h * bytes_per_value))
            inputs += tokens * h * bytes_per_value
            continue
        trains = projections_train_under(model, prefix)
        per_token = layer_saved_bytes(config, gated, source_keys if in_encoder else target_keys, trains, bytes_per_value,
                                      mask_bytes, device, cross_keys=0 if in_encoder else source,
                                      attention_bytes=attention_bytes)
        per_token += extra + _trained_python_norms(model, prefix) * h * bytes_per_value
        cross = 0 if in_encoder else batch_size * source * 2 * kv * head_dim * (attention_bytes or bytes_per_value)  # its keys and values
        layers.append(tokens * per_token + cross)
        inputs += tokens * h * bytes_per_value
    if gradient_checkpointing:  # each layer's input, and one layer recomputed at a time
        saved = inputs + max(layers)
    else:
        saved = sum(layers)
    encoder_output = batch_size * source * h * bytes_per_value if lowest < encoder.layers else 0  # the k/v projections' input
    embeddings_out = batch_size * ((source if lowest < encoder.layers else 0) + target_len) * h * bytes_per_value
    return int(saved + encoder_output + embeddings_out + weight_sized_bytes(model, bytes_per_value))


def _trained_python_norms(model: nn.Module, prefix: str) -> int:
    """The layer's norms written as tensor operations (T5's RMS norm; not `nn.LayerNorm`, whose
    kernel keeps only statistics) whose weight trains: each keeps its normalised input for
    that weight's gradient."""
    count = 0
    for name, module in unwrap_peft(model).named_modules():
        weight = getattr(module, "weight", None)
        if name.startswith(prefix) and type(module).__name__.endswith(("LayerNorm", "RMSNorm")) \
                and not isinstance(module, nn.LayerNorm) and isinstance(weight, nn.Parameter) and weight.requires_grad:
            count += 1
    return count


def evaluation_bytes(model: nn.Module, config: Any, strategy: Any, batch_size: int, source_len: int, target_len: int,
                     bytes_per_value: int) -> int:
    """The most a forward pass without gradients holds at once: the larger of one encoder
    layer's peak over the source and one decoder layer's over the target (see
    `peftkit.memory.evaluation`), the decoder's with the encoder's output and the layer's
    cross-attention keys and values beside it. T5's relative position bias reaches the
    attention as one float mask per example and head, query and key."""
    h, heads, head_dim, kv, intermediate = model_sizes(config)
    gated = bool(getattr(config, "is_gated_act", False))
    per_token = layer_peak_values(h, intermediate, gated, feed_forward_outputs_at_once(model, intermediate))
    biased = getattr(config, "relative_attention_num_buckets", None) is not None
    source = source_len + virtual_tokens(strategy)
    source_keys, target_keys = source_len + virtual_tokens(strategy, "keys"), target_len + virtual_tokens(strategy, "keys")
    encoder = source * (per_token + (heads * source_keys if biased else 0))
    decoder = target_len * (per_token + (heads * max(target_keys, source) if biased else 0)) \
        + source * (h + 2 * kv * head_dim)
    return int(batch_size * max(encoder, decoder) * bytes_per_value)
