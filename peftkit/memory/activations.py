"""What one training step saves for backward, per token and per layer from the lowest layer
that needs gradients: the norm inputs, the projection inputs (only where a layer's own weights
train), q/k/v (and q/k before a rotary embedding), the attention probabilities with their
dropout mask where attention dropout forces PyTorch's math path on CPU (fused kernels keep
only their output and a log-sum-exp), the feed-forward intermediates (three for gated MLPs,
two otherwise, more for an activation written as torch operations), hidden-dropout masks.
With gradient checkpointing only each layer's input plus one layer recomputed. Per-strategy
extras: LoRA's rank-r intermediate and its dropped-out inputs, adapter bottlenecks, IA3's
rescaled tensors, weight-sized copies (DoRA, LoHa, LoKr); prompt tuning's virtual tokens
lengthen the sequence, prefix tuning's only the keys and values.

Under bf16/fp16 autocast it counts the half-precision copy of every fp32 linear weight
(trained ones, and bitfit's frozen neighbours, which stay fp32 too), kept for backward; LoRA's
dropout mask at its input's precision, taken as the run's (a run stops PEFT casting the input
up to its fp32 adapter, `peftkit.models.skip_adapter_input_upcast`), DoRA's in fp32; and fp32
attention tensors on CPU (`attention_bytes`, which `peftkit.memory.estimate` reads off the model). The fp32 copies some models make beyond
those are not counted (docs/estimate.md, "Known gaps").
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import torch
from torch import nn

from peftkit.anatomy import inspect_model, unwrap_peft
from peftkit.memory.sizes import model_sizes, virtual_tokens
from peftkit.memory.weights import kept_fp32


def activation_bytes(model: nn.Module, config: Any, strategy: Any, batch_size: int, seq_len: int,
                     bytes_per_value: int, gradient_checkpointing: bool, device: str = "cpu",
                     attention_bytes: int | None = None) -> int:
    """Tensors saved for backward over one batch, layer by layer from the lowest that needs
    gradients (checked against what autograd really saves in tests/memory/test_estimate.py).
    When the lowest such layer trains only an adapter on its feed-forward sub-layer (pfeiffer,
    parallel), nothing below that adapter needs gradients: the layer keeps only what the
    adapter and the norm after it keep."""
    base = unwrap_peft(model)
    anatomy = inspect_model(base)
    lowest = _lowest_layer_needing_grad(model, anatomy)
    length, keys = seq_len + virtual_tokens(strategy), seq_len + virtual_tokens(strategy, "keys")
    tokens = batch_size * length
    if lowest is None:  # only the head trains: it keeps its input, one vector per example or per token
        return int((tokens if anatomy.head_scores_every_token else batch_size) * config.hidden_size * bytes_per_value)
    mask_bytes = bytes_per_value if device == "cpu" else 1  # dropout keeps a float mask on CPU, a bool one on CUDA
    layers = []
    for index in range(lowest, anatomy.num_layers):
        prefix = f"{anatomy.layers_prefix}.{index}."
        extra = strategy_extra_bytes(model, prefix, bytes_per_value, mask_bytes)
        if index == lowest and trains_only_after_feed_forward(model, prefix):
            layers.append(extra + config.hidden_size * bytes_per_value)  # the adapter's input, and the norm or sum it feeds
        else:
            layers.append(layer_saved_bytes(config, gated(anatomy), keys, projections_train_under(model, prefix),
                                            bytes_per_value, mask_bytes, device, attention_bytes=attention_bytes) + extra)
    if gradient_checkpointing:  # each layer's input, and one layer recomputed at a time
        per_token = len(layers) * config.hidden_size * bytes_per_value + max(layers)
    else:
        per_token = sum(layers)
    embeddings_out = config.hidden_size * bytes_per_value
    return int(tokens * (per_token + embeddings_out) + weight_sized_bytes(model, bytes_per_value))


def trains_only_after_feed_forward(model: nn.Module, prefix: str) -> bool:
    """Whether everything the layer (names starting `prefix`) trains is its feed-forward
    adapter (`adapter_ffn`)."""
    trained = [name.removeprefix("base_model.model.") for name, param in model.named_parameters() if param.requires_grad]
    in_layer = [name for name in trained if name.startswith(prefix)]
    return bool(in_layer) and all(".adapter_ffn." in name for name in in_layer)


def weight_sized_bytes(model: nn.Module, bytes_per_value: int) -> int:
    """Weight-sized tensors some methods keep for backward, whatever the batch: DoRA
    normalises each adapted weight (base + LoRA product) per output row on every forward, 1.5
    copies per adapted projection; LoHa and LoKr rebuild their whole weight update and apply it
    as a second linear map, one copy each. Under bf16/fp16 autocast every fp32 linear weight
    (`kept_fp32`) is cast down once per forward, and its product keeps that copy."""
    copies = 0.0
    for module in model.modules():
        if getattr(module, "lora_magnitude_vector", None):
            copies += 1.5 * module.lora_A["default"].in_features * module.lora_B["default"].out_features
        elif rebuilds_delta_weight(module):
            copies += module.base_layer.weight.numel()
        if bytes_per_value < 4 and isinstance(module, nn.Linear) and kept_fp32(module):
            copies += module.weight.numel()
    return int(copies * bytes_per_value)


def rebuilds_delta_weight(module: nn.Module) -> bool:
    """A PEFT LyCORIS layer (LoHa, LoKr): its update is a full weight matrix, rebuilt each
    forward, whose product with the layer's input keeps that input for backward."""
    from peft.tuners.lycoris_utils import LycorisLayer  # peft imports transformers: kept out of start-up

    return isinstance(module, LycorisLayer) and hasattr(module, "base_layer")


def layer_saved_bytes(config: Any, gated: bool, seq_len: int, projections_train: bool, bytes_per_value: int,
                      mask_bytes: int, device: str, cross_keys: int = 0, attention_bytes: int | None = None) -> int:
    """Bytes one transformer layer saves for backward, per token (see the module docstring);
    `seq_len` is the number of keys each token attends to, `cross_keys` the number of
    encoder states a decoder layer's cross-attention reads (its keys and values are counted
    per encoder state by the caller, `peftkit.memory.encoder_decoder`); `attention_bytes` the
    bytes of one value the attention kernel keeps (its q, k, v and what `_attention_saved`
    counts; default `bytes_per_value`; 4 where it computes in fp32, `peftkit.cpu.attention`).
    SDPA's math path, which CPU training takes when attention drops out, computes in fp32
    whatever its inputs' precision."""
    h, heads, head_dim, kv, intermediate = model_sizes(config)
    attention_bytes = 4 if _cpu_math_path(config, device) else attention_bytes or bytes_per_value
    attention_mask_bytes = attention_bytes if device == "cpu" else mask_bytes  # a CPU mask is float, as its input
    hidden_dropout = _dropout(config, "hidden_dropout_prob", "resid_pdrop", "dropout_rate", "dropout")
    values = 2 * h                                           # the two norm inputs
    if getattr(config, "rope_parameters", None) or hasattr(config, "rope_theta"):
        values += (heads + kv) * head_dim                    # rotary embeddings keep q and k before rotation
    values += (3 if gated else 1) * intermediate             # the activation's input (gated: gate, up, act(gate))
    values += (activation_saved_values(config) - 1) * intermediate  # what else the activation keeps (gelu_new: 3)
    inner, inner_masks = _attention_saved(config, heads, seq_len, device)
    inner += (heads + 2 * kv) * head_dim                     # the kernel's q, k, v
    masks = 2 * h if hidden_dropout else 0                   # after the attention and feed-forward outputs
    masks += intermediate if _dropout(config, "dropout_rate", "activation_dropout") else 0  # T5, BART: inside the FFN
    if projections_train:  # a linear layer keeps its input only to compute its weight's gradient
        values += 3 * h + intermediate                       # q/k/v input, output-projection input, FFN in/out inputs
    if cross_keys:  # its norm's input and queries, the attention, its output's dropout mask, the projections' inputs
        attention, cross_masks = _attention_saved(config, heads, cross_keys, device)
        values += h + (2 * h if projections_train else 0)
        inner += heads * head_dim + attention
        inner_masks += cross_masks
        masks += h if hidden_dropout else 0
    values += _disentangled_attention_values(config, seq_len)
    return int(values * bytes_per_value + masks * mask_bytes + inner * attention_bytes + inner_masks * attention_mask_bytes)


@functools.lru_cache(maxsize=None)
def _saved_per_value(activation: str) -> int:
    from transformers.activations import ACT2FN  # kept out of start-up

    saved: dict[int, int] = {}

    def keep(tensor: torch.Tensor) -> torch.Tensor:
        saved.setdefault(tensor.untyped_storage().data_ptr(), tensor.untyped_storage().nbytes())
        return tensor

    # no random draw (an estimate inside a run must leave the seeded generator alone); not a leaf,
    # so the activation's own input counts
    inputs = torch.linspace(-3, 3, 64, requires_grad=True) * 1.0
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
        ACT2FN[activation](inputs)
    return round(sum(saved.values()) / inputs.nbytes)


def activation_saved_values(config: Any) -> int:
    """Intermediate-sized tensors the feed-forward activation keeps for backward, per value of
    its input, found by running it once on a small tensor: 1 for torch's own kernels (GELU,
    SiLU, ReLU keep their input or output), more for activations written as a composition of
    torch operations, each of which keeps its own operands (GPT-2's `gelu_new`, the tanh
    formula: 4; `quick_gelu`: 2)."""
    name = next((n for n in (getattr(config, a, None) for a in ("hidden_act", "activation_function", "dense_act_fn"))
                 if isinstance(n, str)), None)
    try:
        return _saved_per_value(name) if name else 1
    except KeyError:  # an activation transformers does not name (a model's own code): torch's kernels' one
        return 1


def _attention_saved(config: Any, heads: int, keys: int, device: str) -> tuple[int, int]:
    """(values, dropout-mask values) one token's attention over `keys` keys saves: the math
    path (attention dropout on CPU, or the eager implementation with dropout) keeps the
    probabilities, their dropped-out copy and the mask; eager without dropout the
    probabilities; fused kernels their output and a log-sum-exp per head."""
    attention_dropout = _attention_dropout(config)
    eager = getattr(config, "_attn_implementation", None) == "eager"
    if device == "cpu" and attention_dropout or eager and attention_dropout:
        return 2 * heads * keys, heads * keys
    if eager:
        return heads * keys, 0
    return config.hidden_size + heads, 0


def _attention_dropout(config: Any) -> bool:
    return _dropout(config, "attention_probs_dropout_prob", "attention_dropout", "dropout_rate")


def _cpu_math_path(config: Any, device: str) -> bool:
    """Whether training attention runs SDPA's math path: on CPU, under attention dropout."""
    return device == "cpu" and _attention_dropout(config) and getattr(config, "_attn_implementation", None) != "eager"


def _disentangled_attention_values(config: Any, seq_len: int) -> float:
    """DeBERTa-v2's attention, per token: it scales the keys before their product with the
    queries, which keeps the scaled copy; and each relative-position term (c2p, p2c) multiplies
    the content by the projected position embeddings, repeated for every example, which that
    product keeps (2 x span x hidden values per example and term, shared by its `seq_len`
    tokens; span: `position_buckets`, else `max_relative_positions`, else
    `max_position_embeddings`), and gathers each token's relative positions from the product's
    heads x 2 x span scores, which the gather keeps too."""
    if config.model_type != "deberta-v2":
        return 0.0
    values = float(config.hidden_size)
    if getattr(config, "relative_attention", False):
        kinds = config.pos_att_type.split("|") if isinstance(config.pos_att_type, str) else (config.pos_att_type or [])
        span = next(s for s in (getattr(config, "position_buckets", -1), getattr(config, "max_relative_positions", -1),
                                config.max_position_embeddings) if s and s > 0)
        terms = sum(kind in ("c2p", "p2c") for kind in kinds)
        values += terms * 2 * span * (config.hidden_size / seq_len + config.num_attention_heads)
    return values


def gated(anatomy: Any) -> bool:
    """Whether the feed-forward block is gated (Llama-style gate_proj), also under a PEFT
    wrapper, whose layers are named `mlp.gate_proj.base_layer`."""
    return any("gate_proj" in suffix.split(".") for suffix in anatomy.layer_linear_suffixes)


def _dropout(config: Any, *names: str) -> bool:
    return any((getattr(config, name, 0.0) or 0.0) > 0 for name in names)


def projections_train_under(model: nn.Module, prefix: str) -> bool:
    """Whether any of the layer's own linear weights (names starting `prefix`, e.g.
    `encoder.layer.3.`) train (full, partial) or get a weight-sized update (LoHa, LoKr), not
    only biases, norms or small added modules."""
    if any(prefix in name + "." and rebuilds_delta_weight(module) for name, module in model.named_modules()):
        return True
    for name, param in model.named_parameters():
        clean = name.removeprefix("base_model.model.")
        if param.requires_grad and param.dim() == 2 and clean.startswith(prefix) \
                and clean.endswith(".weight") and not any(m in clean for m in ("lora_", "adapter", "ia3_", "modules_to_save")):
            return True
    return False


def strategy_extra_bytes(model: nn.Module, prefix: str, bytes_per_value: int, mask_bytes: int) -> int:
    """Per token in the layer whose modules' names contain `prefix`: LoRA's dropped-out inputs,
    their masks and rank-r outputs; an adapter's input and bottleneck; the tensors IA3's
    vectors rescale."""
    extra = 0
    for name, module in model.named_modules():
        if prefix not in name + ".":
            continue
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, nn.ModuleDict) and "default" in lora_a:
            a = lora_a["default"]
            dropped = lora_drops_out(module)
            dora = bool(getattr(module, "lora_magnitude_vector", None))
            # under autocast LoRA's input keeps its precision, its mask too; DoRA's is cast up to
            # fp32 (`models.skip_adapter_input_upcast`), a CPU mask with it
            lora_mask_bytes = 4 if dora and mask_bytes > 1 else mask_bytes
            extra += (a.in_features + a.out_features) * bytes_per_value + (a.in_features * lora_mask_bytes if dropped else 0)
            if dora:  # DoRA rescales the base and LoRA outputs
                extra += 2 * module.lora_B["default"].out_features * bytes_per_value
        ia3 = getattr(module, "ia3_l", None)
        if isinstance(ia3, nn.ParameterDict) and "default" in ia3:
            extra += ia3["default"].numel() * bytes_per_value
        if _is_bottleneck_adapter(module):
            extra += (module.down.in_features + module.down.out_features) * bytes_per_value
    return extra


def _is_bottleneck_adapter(module: nn.Module) -> bool:
    """A bottleneck adapter (`peftkit.strategies.bottleneck.Adapter`: down, up and where it
    reads), told by its parts: the strategies sit above this formula, which imports none."""
    return isinstance(getattr(module, "down", None), nn.Linear) and isinstance(getattr(module, "up", None), nn.Linear) \
        and hasattr(module, "reads")


def lora_drops_out(module: nn.Module) -> bool:
    """Whether a PEFT LoRA layer applies dropout to its input (PEFT puts an identity there at 0)."""
    dropout = module.lora_dropout["default"]
    return isinstance(dropout, nn.Dropout) and dropout.p > 0


def _lowest_layer_needing_grad(model: nn.Module, anatomy: Any) -> int | None:
    """The lowest layer whose activations backward needs, or None when only the head trains.
    Trainable tensors outside the base model (virtual tokens) and the embeddings sit at the
    input (layer 0); a final norm or pooler sits above the last layer."""
    base_names = {n for n, _ in unwrap_peft(model).named_parameters()}

    def place(name: str) -> int:
        index = anatomy.layer_index(name)
        if index is not None:
            return index
        return anatomy.num_layers - 1 if name in base_names and anatomy.region(name) == "top" else 0

    return lowest_trained_place(model, place, anatomy.is_head)


def lowest_trained_place(model: nn.Module, place: Callable[[str], int], is_head: Callable[[str], bool]) -> int | None:
    """The lowest `place` (a layer's index, from a base parameter's name) of any tensor that
    trains outside the head (and outside PEFT's trained copies of it), or None when none does:
    from that layer up, backward needs the activations."""
    places = [place(clean) for name, param in model.named_parameters()
              if param.requires_grad and "modules_to_save" not in (clean := name.removeprefix("base_model.model."))
              and not is_head(clean)]
    return min(places, default=None)
