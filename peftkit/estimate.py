"""Analytic peak training memory from a model's config alone (no weights: meta device).

Terms, each computed from the model as the strategy would train it:
- weights: frozen tensors in the run's `dtype`, trainable ones in fp32; a 4-bit base stores
  half a byte per value plus its quantization constants (one fp32 absmax per 64-value block,
  or with double quantization one byte per block plus one fp32 per 256 blocks);
- gradients: 4 bytes per trainable parameter (fp32, also under mixed precision). They live in
  the training phase only (Trainer drops them after each optimizer step, before evaluating),
  and backward frees each layer's saved activations as that layer's gradients appear, so a
  step holds the larger of its backward's start and end, not their sum: at the start every
  activation, the output layer's loss and the gradients of the trained tensors above the
  layers (`gradients_at_backward_start`: the head, the final norm, an LM head tied to the
  embeddings; every gradient when micro-batches accumulate them); at the end every gradient,
  and a tied tensor's two contributions, which autograd adds out of place, so both are held
  beside their sum (`tied_gradient_copies`). Measured on MiniLM full fine-tuning (16 x 51
  tokens): backward peaked 5 MB above the forward pass's end, not the gradients' 87 MB above
  it (tests/test_estimate.py checks both ends on tiny models, tensor by tensor);
- optimizer, per trainable tensor: AdamW's two fp32 states (8 bytes per value, also paged
  32-bit AdamW); bitsandbytes' 8-bit AdamW (plain or paged) one byte per state and an fp32
  absmax per 256-value block for tensors of 4,096 values or more, fp32 states below that;
  Adafactor (no first moment) one fp32 value per row and per column of a matrix, per value of a
  vector; plain SGD none. Gradient clipping (max_grad_norm) and torch.compile add nothing
  counted (compile can only fuse activations away: the count stays an upper bound);
- best weights: peftkit keeps a copy of the trainable tensors at the best evaluation (4 bytes
  each), unless the run keeps its last weights (`select: last`);
- activations saved for backward, per token and per layer from the lowest layer that needs
  gradients: norm inputs, the projection inputs, q/k/v (and q/k before a rotary embedding), the
  attention probabilities with their dropout mask where attention dropout forces PyTorch's math
  path on CPU (fused kernels keep only their output and a log-sum-exp), the feed-forward
  intermediates (three for gated MLPs, two otherwise), hidden-dropout masks; with gradient checkpointing only each layer's input plus one layer
  recomputed; per-strategy extras (LoRA's rank-r intermediate and its dropped-out inputs,
  adapter bottlenecks); prompt tuning's virtual tokens lengthen the sequence, prefix tuning's
  only the keys and values;
- evaluation: the per-epoch evaluation's forward pass without gradients, in its own (larger)
  batch: what one layer holds at its peak, inside the feed-forward block: the layer's input,
  the residual stream and the normalised input, the feed-forward intermediates (two; three
  for gated MLPs, whose layers hold one more hidden-size buffer), and beside them an unmerged
  adapter's update of the up projection (LoRA: one more; DoRA: up to five more). Without dropout, attention
  runs in a fused kernel that never stores the scores (the eager implementation does). No
  key/value cache (classifiers are loaded with `use_cache=False`), except the one prefix
  tuning passes its prefixes in: every layer's keys and values. Training activations are
  freed before it runs, so only the larger of the two counts towards the total; the output
  layer's evaluation loss (`evaluation_output`) runs after the layers, so only the larger of
  it and this term counts;
- generation (a decoder-only LM generating its validation answers, `tasks.sft`): a pass of its
  own, after the evaluation loss: the key/value cache of the largest generation batch (prompt
  and new tokens, every layer) and its prompt's forward pass (`generation_forward`, counted
  as `evaluation` is). Runs record that batch (rows, longest prompt): generation sorts prompts
  by length, so the longest ones sit in the last, often smaller, batch. The phases never
  coexist: the largest of training, evaluation and generation counts;
- runtime: on CPU, what the process holds besides tensors (tokenizer, data, Trainer);
- cached_features: a linear probe on cached features keeps them while its head trains: one
  fp32 hidden-size vector per training and selection example, or per labelled token for NER
  (the count comes from the run's data, so `peftkit estimate` alone leaves it out).

An encoder-decoder (T5, BART) has two layer stacks, counted in `peftkit.estimate_encoder_decoder`
(the encoder's layers over the source, the decoder's over the target with cross-attention to
the source); its output layer's vocabulary-size logits are the task's (`tasks.seq2seq`).

Under bf16/fp16 autocast, counted: the half-precision copy of every fp32 linear weight (trained
ones, and bitfit's frozen neighbours, which stay fp32 too), kept for backward; LoRA's dropout
mask at its input's precision, taken as the run's (a run stops PEFT casting the input up to
its fp32 adapter, `peftkit.models.skip_adapter_input_upcast`), DoRA's in fp32; fp32 attention
tensors on CPU (`attention_value_bytes`). Against what autograd keeps for one bf16 training
forward of 8 x 32 tokens on CPU, activations estimated / measured are 0.86-1.05 on MiniLM and
SmolLM2-135M across 15 strategies (benchmarks/results/saved_activations_bf16.md). Known gap
there: other fp32 copies some models make are not counted (full fine-tuning's fp32 residual
stream and norm outputs; T5 keeps its `wo` projections in fp32, so its residual stream runs in
fp32: a random t5-small-sized LoRA run measured 3.1 GB against 2.0 GB estimated; an fp32 base
under bf16 autocast, `--dtype fp32 --precision bf16`, keeps its residual stream and norm
outputs in fp32 too, and with them the dropout masks of the projections they feed, LoRA's
among them, counted at bf16). The published checks (benchmarks/results/estimate_check.md) run
in fp32.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from peftkit.anatomy import head_is_one_linear, inspect_model, unwrap_peft
from peftkit.config import native_precision
from peftkit.errors import PeftkitError
from peftkit.strategies import Strategy, build_strategy
from peftkit.strategies.bottleneck import Adapter
from peftkit.tasks import Task, resolve_task

GB = 1024**3
FIT_SIZES_GB = (16, 24, 40, 80)
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
OPTIMIZERS = ("adamw", "adamw-8bit", "paged-adamw-8bit", "paged-adamw-32bit", "sgd", "adafactor")
BNB_MIN_8BIT_SIZE, BNB_STATE_BLOCK = 4096, 256  # bitsandbytes' 8-bit optimizers: smaller tensors keep fp32 states
BLOCK = 64               # bitsandbytes 4-bit block size
CPU_RUNTIME_BYTES = 128 * 2**20   # measured: resident memory a CPU run adds beyond its tensors
TRAINING_TERMS = ("activations", "output_layer", "gradients", "gradients_at_backward_start", "tied_gradient_copies")
LOGPROB_TOKEN_CHUNK, LOGPROB_VOCAB_CHUNK = 4096, 32768  # TRL's chunked log-prob tiles (trl.kernels.chunked_logprob)
# tile-sized fp32 tensors alive at once when torch folds a tile (fused_lm_head_bytes); the bool target mask counts 1/4
LM_HEAD_FORWARD_BUFFERS, LM_HEAD_BACKWARD_BUFFERS = 4, 8.25
EVALUATION_TERMS = ("evaluation", "evaluation_output")
GENERATION_TERMS = ("generation_forward", "generation_cache")
PHASES = (TRAINING_TERMS, EVALUATION_TERMS, GENERATION_TERMS)


@dataclass
class Estimate:
    """A memory breakdown in bytes, by term."""

    terms: dict[str, int]
    trainable_params: int
    total_params: int
    settings: dict[str, Any] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        """Every term, except that the phases never coexist: only the largest counts.
        Training holds its saved activations and the output layer's loss at once, and its
        gradients appear as backward frees the activations (the module docstring); evaluation
        runs its layers' forward pass, then the output layer's loss (or an encoder-decoder's
        generation), so only the larger of the two; generation holds the key/value cache
        while its prompts' forward pass runs."""
        training, evaluation, generation = ([self.terms.get(t, 0) for t in terms] for terms in PHASES)
        activations, output_layer, gradients, at_start, tied_copies = training
        backward = max(activations + output_layer + at_start, gradients + tied_copies)  # its start, its end
        phases = [backward, max(evaluation), sum(generation)]
        return sum(self.terms.values()) - sum(training) - sum(evaluation) - sum(generation) + max(phases)

    def fits(self, gigabytes: float) -> bool:
        return self.total_bytes <= gigabytes * GB

    def as_dict(self) -> dict[str, Any]:
        return {"terms": self.terms, "total_bytes": self.total_bytes, "trainable_params": self.trainable_params,
                "total_params": self.total_params, "settings": self.settings}


def load_config(model: str) -> Any:
    """A transformers config from a config.json file, a checkpoint directory, an alias or a hub id."""
    from transformers import AutoConfig

    path = Path(model)
    if path.suffix == ".json":
        if not path.is_file():
            raise PeftkitError(f"model config {path} does not exist: pass a config.json file, a checkpoint or an alias")
        return AutoConfig.for_model(**_read_json(path))
    from peftkit.models import resolve_model

    source = resolve_model(model)
    try:
        return AutoConfig.from_pretrained(source.path)
    except OSError as err:
        raise PeftkitError(f"cannot read the config of '{model}': {str(err).splitlines()[0][:160]}") from None


def _read_json(path: Path) -> dict:
    import json

    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise PeftkitError(f"cannot read model config {path}: {err}") from None


def estimate(model: str, strategy: Strategy | str, batch_size: int = 4, seq_len: int = 512, dtype: str = "auto",
             gradient_checkpointing: bool = False, optimizer: str = "adamw", num_labels: int = 2,
             device: str = "cuda", quantization: str = "none", eval_batch_size: int | None = None,
             eval_seq_len: int | None = None, task: Task | str = "classification", max_new_tokens: int = 0,
             precision: str | None = None, attn_implementation: str = "auto", keeps_best: bool = True,
             answer_tokens: int | None = None, eval_answer_tokens: int | None = None,
             feature_rows: int = 0, num_beams: int = 1, generation_batch: tuple[int, int] | None = None,
             accumulates_gradients: bool = False) -> Estimate:
    """Peak training memory of `strategy` on `model` for one batch of `batch_size` x `seq_len`,
    evaluated each epoch in batches of `eval_batch_size` x `eval_seq_len` (defaults: the
    training batch), for `task` (a kind or a built-in data set name). `dtype` is the frozen
    weights' (auto: bf16 on cuda and on a CPU that computes bf16 natively, else fp32); `precision` the activations' (default: dtype);
    `attn_implementation` the attention kernel (only eager stores the scores; auto on CPU under
    bf16/fp16 keeps fp32 attention tensors, `peftkit.cpu.attention`); `keeps_best`
    whether a copy of the best trainable weights is kept (`select: best`); `answer_tokens` and
    `eval_answer_tokens` the most labelled positions of one example, where the task's output
    layer scores those alone (sft; default: every position); `feature_rows` the feature vectors
    a linear probe caches (one per example, or per labelled token for NER), kept in fp32 while
    the head trains on them; `num_beams` the beams generation keeps per example;
    `generation_batch` the (rows, prompt tokens) of the largest batch a decoder-only LM
    generates in (default: the evaluation batch at its longest example); `accumulates_gradients`
    whether an optimizer step sums several micro-batches' gradients. For an
    encoder-decoder `seq_len` is the source's length and the answer tokens the target's."""
    eval_batch_size, eval_seq_len = eval_batch_size or batch_size, eval_seq_len or seq_len
    generation_batch = generation_batch or (eval_batch_size, eval_seq_len)
    if dtype == "auto":
        dtype = "fp32" if native_precision(device) == "fp32" else "bf16"
    precision = precision or dtype
    for name, value in (("dtype", dtype), ("precision", precision)):
        if value not in DTYPE_BYTES:
            raise PeftkitError(f"unknown {name} '{value}': choose one of {', '.join(DTYPE_BYTES)}")
    if optimizer not in OPTIMIZERS:
        raise PeftkitError(f"unknown optimizer '{optimizer}': choose one of {', '.join(OPTIMIZERS)}")
    strategy = build_strategy(strategy) if isinstance(strategy, str) else strategy
    task = resolve_task(task)[0] if isinstance(task, str) else task
    task.check_strategy(strategy)
    if quantization not in ("none", "nf4", "fp4"):
        raise PeftkitError(f"unknown quantization '{quantization}': choose none, nf4 or fp4")
    strategy.check_quantization(quantization)
    config = load_config(model)
    config.num_labels = num_labels
    if attn_implementation != "auto":
        # flash attention, like sdpa, stores no score matrix (only "eager" changes a term); building the
        # empty model with it would import the flash-attn package, which a machine without a GPU lacks
        config._attn_implementation = "sdpa" if attn_implementation.startswith("flash") else attn_implementation
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = 0
    meta = meta_model(config, strategy, task)
    quantized = strategy.quantization_config(torch.float32) is not None or quantization != "none"
    trainable = sum(p.numel() for p in meta.parameters() if p.requires_grad)
    values_bytes = DTYPE_BYTES[precision]
    attention_bytes = attention_value_bytes(meta, device, precision, attn_implementation)
    terms = {
        "weights": weight_bytes(meta, quantized, DTYPE_BYTES[dtype], getattr(strategy, "double_quant", True)),
        "gradients": 4 * trainable,
        **backward_gradient_terms(meta, accumulates_gradients),
        "optimizer": optimizer_bytes(meta, optimizer),
        "best_weights": 4 * trainable if keeps_best else 0,  # `select: last` evaluates nothing, keeps no copy
        **_layer_terms(meta, config, strategy, batch_size, seq_len, eval_batch_size, eval_seq_len, values_bytes,
                       gradient_checkpointing, device, answer_tokens, eval_answer_tokens, attention_bytes),
        **task.output_memory(config, batch_size, seq_len, eval_batch_size, eval_seq_len, values_bytes, device,
                             max_new_tokens, answer_tokens, eval_answer_tokens, num_beams, generation_batch),
        "runtime": CPU_RUNTIME_BYTES if device == "cpu" else 0,
        "cached_features": 4 * feature_rows * model_sizes(config)[0] if strategy.frozen_below_head and head_is_one_linear(meta) else 0,
    }
    if not strategy.trains_anything:  # the untuned model is only evaluated: no training phase
        terms.update(dict.fromkeys(TRAINING_TERMS, 0))
    if "generation_cache" in terms:
        rows, prompt = generation_batch
        terms["generation_forward"] = evaluation_bytes(meta, config, strategy, rows * num_beams, prompt, values_bytes)
    total = sum(p.numel() for p in meta.parameters())  # logical values, 4-bit ones included
    settings = {"model": model, "task": task.name, "strategy": strategy.name, "batch_size": batch_size, "seq_len": seq_len,
                "dtype": dtype, "precision": precision, "attn_implementation": attn_implementation,
                "gradient_checkpointing": gradient_checkpointing, "optimizer": optimizer, "device": device,
                "quantization": getattr(strategy, "quant_type", "nf4") if quantized and quantization == "none" else quantization,
                "eval_batch_size": eval_batch_size, "eval_seq_len": eval_seq_len, "answer_tokens": answer_tokens,
                "num_beams": num_beams, "accumulates_gradients": accumulates_gradients}
    return Estimate(terms, trainable, total, settings)


def _layer_terms(meta: nn.Module, config: Any, strategy: Strategy, batch_size: int, seq_len: int, eval_batch_size: int,
                 eval_seq_len: int, values_bytes: int, gradient_checkpointing: bool, device: str,
                 answer_tokens: int | None, eval_answer_tokens: int | None, attention_bytes: int) -> dict[str, int]:
    """The layers' `activations` and `evaluation` terms: one stack, or an encoder-decoder's two
    (`peftkit.estimate_encoder_decoder`), whose `seq_len` is the source's and whose answer
    tokens are the target's (default: as long as the source)."""
    if getattr(config, "is_encoder_decoder", False):
        from peftkit import estimate_encoder_decoder as two_stacks

        return {"activations": two_stacks.activation_bytes(meta, config, strategy, batch_size, seq_len,
                                                           answer_tokens or seq_len, values_bytes,
                                                           gradient_checkpointing, device, attention_bytes),
                "evaluation": two_stacks.evaluation_bytes(meta, config, strategy, eval_batch_size, eval_seq_len,
                                                          eval_answer_tokens or eval_seq_len, values_bytes)}
    return {"activations": activation_bytes(meta, config, strategy, batch_size, seq_len, values_bytes,
                                            gradient_checkpointing, device, attention_bytes),
            "evaluation": evaluation_bytes(meta, config, strategy, eval_batch_size, eval_seq_len, values_bytes)}


def backward_gradient_terms(model: nn.Module, accumulates: bool) -> dict[str, int]:
    """The gradients backward holds before it frees any layer's activations (those of trained
    tensors above the layers: the head, the final norm, an output layer tied to the
    embeddings, which receives its first gradient there; all of them when an earlier
    micro-batch left its gradients to be summed), and the tied tensors' contributions held beside
    their sum (autograd adds them out of place), in bytes (see the module docstring)."""
    base = unwrap_peft(model)
    anatomy = inspect_model(base)
    # an encoder-decoder's token embeddings sit outside its decoder stack, in front of it
    embeddings = {name for name, module in base.named_modules(remove_duplicate=False) if isinstance(module, nn.Embedding)}
    names: dict[int, tuple[nn.Parameter, list[str]]] = {}
    for name, param in base.named_parameters(remove_duplicate=False):
        if param.requires_grad:
            names.setdefault(id(param), (param, []))[1].append(name)

    def above(name: str) -> bool:
        region = anatomy.region(name)
        return region == "head" or region == "top" and name.rpartition(".")[0] not in embeddings

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    first = trainable if accumulates else sum(p.numel() for p, ns in names.values() if any(map(above, ns)))
    # autograd adds a shared tensor's contributions out of place, one pair at a time: two copies beside the sum
    return {"gradients_at_backward_start": 4 * first,
            "tied_gradient_copies": 2 * 4 * sum(p.numel() for p, ns in names.values() if len(ns) > 1)}


def optimizer_bytes(model: nn.Module, optimizer: str) -> int:
    """The optimizer's state for the trainable tensors (see the module docstring)."""
    total = 0
    for param in model.parameters():
        if not param.requires_grad:
            continue
        n = param.numel()
        if optimizer in ("adamw", "paged-adamw-32bit"):
            total += 8 * n
        elif optimizer in ("adamw-8bit", "paged-adamw-8bit"):
            total += 2 * n + 2 * 4 * -(-n // BNB_STATE_BLOCK) if n >= BNB_MIN_8BIT_SIZE else 8 * n
        elif optimizer == "adafactor":
            total += 4 * (param.shape[-2] + param.shape[-1] if param.dim() >= 2 else n)
    return total


def meta_model(config: Any, strategy: Strategy, task: Task, pooling: str = "model") -> nn.Module:
    """The task model on the meta device (no memory), with the strategy applied and its head
    reading the model through `pooling` (what cannot work fails here, in one line)."""
    import transformers

    from peftkit.pooling import read_with

    with torch.device("meta"):
        plain = getattr(transformers, task.model_class).from_config(config)
        return read_with(pooling, plain, lambda model: strategy.apply(model, task))


def _quantizable(name: str, module: nn.Module, head: tuple[str, ...]) -> bool:
    return isinstance(module, nn.Linear) and not any(name == h or name.startswith(h + ".") for h in head) \
        and "lora_" not in name and "modules_to_save" not in name and "original_module" not in name


def weight_bytes(model: nn.Module, quantized: bool, dtype_bytes: int, double_quant: bool) -> int:
    """Stored weights; 4-bit linear weights with their quantization constants."""
    quantized_ids = set()
    if quantized:
        head = inspect_model(unwrap_peft(model)).head_modules
        for name, module in unwrap_peft(model).named_modules():
            if _quantizable(name, module, head) and hasattr(module, "weight"):
                quantized_ids.add(id(module.weight))
    total, seen = 0, set()
    for module in model.modules():
        fp32 = _kept_fp32(module)
        for param in module.parameters(recurse=False):
            if id(param) in seen:  # tied (an LM head that is the embedding matrix): stored once
                continue
            seen.add(id(param))
            n = param.numel()
            if id(param) in quantized_ids:
                blocks = n / BLOCK
                constants = blocks * 1 + blocks / 256 * 4 if double_quant else blocks * 4
                total += n / 2 + constants
            else:
                total += (4 if fp32 else dtype_bytes) * n
    return int(total)


def _kept_fp32(module: nn.Module) -> bool:
    """Whether `module`'s own weights stay fp32 under a half-precision base: it holds a trained
    one (`peftkit.models.keep_trainable_fp32`: trained tensors and their frozen neighbours,
    bitfit's frozen weights beside its trained biases)."""
    return any(p.requires_grad for p in module.parameters(recurse=False))


def activation_bytes(model: nn.Module, config: Any, strategy: Strategy, batch_size: int, seq_len: int,
                     bytes_per_value: int, gradient_checkpointing: bool, device: str = "cpu",
                     attention_bytes: int | None = None) -> int:
    """Tensors saved for backward over one batch, layer by layer from the lowest that needs
    gradients. Checked against what autograd really saves in tests/test_estimate.py. When the
    lowest such layer trains only an adapter on its feed-forward sub-layer (pfeiffer,
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
            layers.append(layer_saved_bytes(config, _gated(anatomy), keys, projections_train_under(model, prefix),
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
    """Weight-sized tensors some methods keep for backward, whatever the batch (measured with
    saved-tensor hooks on MiniLM): DoRA normalises each adapted weight (base + LoRA product)
    per output row on every forward, 1.5 copies per adapted projection; LoHa and LoKr rebuild
    their whole weight update and apply it as a second linear map, one copy each. Under
    bf16/fp16 autocast every fp32 linear weight (`_kept_fp32`) is cast down once per forward,
    and its product keeps that copy (full fine-tuning of SmolLM2-135M in bf16: 212 MB)."""
    copies = 0.0
    for module in model.modules():
        if getattr(module, "lora_magnitude_vector", None):
            copies += 1.5 * module.lora_A["default"].in_features * module.lora_B["default"].out_features
        elif _rebuilds_delta_weight(module):
            copies += module.base_layer.weight.numel()
        if bytes_per_value < 4 and isinstance(module, nn.Linear) and _kept_fp32(module):
            copies += module.weight.numel()
    return int(copies * bytes_per_value)


def _rebuilds_delta_weight(module: nn.Module) -> bool:
    """A PEFT LyCORIS layer (LoHa, LoKr): its update is a full weight matrix, rebuilt each
    forward, whose product with the layer's input keeps that input for backward."""
    from peft.tuners.lycoris_utils import LycorisLayer

    return isinstance(module, LycorisLayer) and hasattr(module, "base_layer")


def layer_saved_bytes(config: Any, gated: bool, seq_len: int, projections_train: bool, bytes_per_value: int,
                      mask_bytes: int, device: str, cross_keys: int = 0, attention_bytes: int | None = None) -> int:
    """Bytes one transformer layer saves for backward, per token (see the module docstring);
    `seq_len` is the number of keys each token attends to, `cross_keys` the number of
    encoder states a decoder layer's cross-attention reads (its keys and values are counted
    per encoder state by the caller, `estimate_encoder_decoder`); `attention_bytes` the bytes
    of one value the attention kernel keeps (its q, k, v and what `_attention_saved` counts;
    default `bytes_per_value`; 4 where it computes in fp32, `attention_value_bytes`). SDPA's
    math path, which CPU training takes when attention drops out, computes in fp32 whatever its
    inputs' precision."""
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
    from transformers.activations import ACT2FN

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


def attention_value_bytes(model: nn.Module, device: str, precision: str, attn_implementation: str) -> int:
    """Bytes per value the attention kernel keeps for backward: 4 where peftkit computes SDPA
    in fp32 (on CPU under bf16/fp16 with `attn_implementation` auto, a model that can switch:
    `peftkit.cpu.attention`), else the activations' own."""
    from peftkit.cpu.attention import can_use_fp32_cpu_attention

    fp32_on_cpu = device == "cpu" and precision != "fp32" and attn_implementation == "auto"
    return 4 if fp32_on_cpu and can_use_fp32_cpu_attention(model) else DTYPE_BYTES[precision]


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


def _gated(anatomy: Any) -> bool:
    """Whether the feed-forward block is gated (Llama-style gate_proj), also under a PEFT
    wrapper, whose layers are named `mlp.gate_proj.base_layer`."""
    return any("gate_proj" in suffix.split(".") for suffix in anatomy.layer_linear_suffixes)


def _dropout(config: Any, *names: str) -> bool:
    return any((getattr(config, name, 0.0) or 0.0) > 0 for name in names)


def projections_train_under(model: nn.Module, prefix: str) -> bool:
    """Whether any of the layer's own linear weights (names starting `prefix`, e.g.
    `encoder.layer.3.`) train (full, partial) or get a weight-sized update (LoHa, LoKr), not
    only biases, norms or small added modules."""
    if any(prefix in name + "." and _rebuilds_delta_weight(module) for name, module in model.named_modules()):
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
            dropped = _lora_drops_out(module)
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
        if isinstance(module, Adapter):
            extra += (module.down.in_features + module.down.out_features) * bytes_per_value
    return extra


def evaluation_bytes(model: nn.Module, config: Any, strategy: Strategy, batch_size: int, seq_len: int,
                     bytes_per_value: int) -> int:
    """The most one layer holds at once in a forward pass without gradients (see the module
    docstring). Checked per strategy by benchmarks/evaluation_peak.py (the process high-water
    mark over a no-gradient forward of 256 x 128 tokens, SmolLM2: 128 x 128), values per token
    measured (counted): MiniLM 4,224 (4,224), with LoRA, QLoRA, LoHa or LoKr 5,759-5,784
    (5,760), DoRA 10,427 (10,368); SmolLM2-135M 6,911 (6,912), LoRA, QLoRA, LoHa or LoKr
    8,447-8,465 (8,448), DoRA 11,614 (13,056)."""
    length, keys = seq_len + virtual_tokens(strategy), seq_len + virtual_tokens(strategy, "keys")
    h, heads, _, _, intermediate = model_sizes(config)
    gated = _gated(inspect_model(unwrap_peft(model)))
    per_token = layer_peak_values(h, intermediate, gated, feed_forward_outputs_at_once(model, intermediate))
    if getattr(config, "_attn_implementation", None) == "eager":  # scores and probabilities, stored
        per_token += 2 * heads * keys
    return int(batch_size * (length * per_token + _prefix_cache_values(config, strategy, keys)) * bytes_per_value)


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
    from peft.tuners.lora import LoraLayer

    most = 1
    for module in model.modules():
        base = getattr(module, "base_layer", None)
        if getattr(base, "out_features", None) != intermediate:
            continue
        if getattr(module, "lora_magnitude_vector", None):
            most = max(most, 6 if _lora_drops_out(module) else 5)
        elif isinstance(module, LoraLayer) or _rebuilds_delta_weight(module):
            most = max(most, 3)
    return most


def _lora_drops_out(module: nn.Module) -> bool:
    """Whether a PEFT LoRA layer applies dropout to its input (PEFT puts an identity there at 0)."""
    dropout = module.lora_dropout["default"]
    return isinstance(dropout, nn.Dropout) and dropout.p > 0


def _prefix_cache_values(config: Any, strategy: Strategy, keys: int) -> int:
    """Prefix tuning hands its prefixes to the model as a key/value cache, which every layer
    extends with its own keys and values and which lives to the end of the forward pass:
    per example, every layer's keys and values over prefix and input."""
    if getattr(strategy, "virtual_tokens_enter", "input") != "keys":
        return 0
    _, _, head_dim, kv, _ = model_sizes(config)
    return config.num_hidden_layers * 2 * kv * head_dim * keys


def virtual_tokens(strategy: Strategy, where: str = "input") -> int:
    """Virtual tokens the strategy adds to the input sequence, or (`where="keys"`) to the keys:
    prompt tuning lengthens both, prefix tuning only the keys and values."""
    count = int(getattr(strategy, "num_virtual_tokens", 0) or 0)
    return count if where == "keys" or getattr(strategy, "virtual_tokens_enter", "input") == "input" else 0


def model_sizes(config: Any) -> tuple[int, int, int, int, int]:
    """(hidden size, attention heads, head dim, key/value heads, feed-forward width), under
    each family's names (T5: d_kv, d_ff; BART: encoder_ffn_dim)."""
    h = config.hidden_size
    heads = config.num_attention_heads
    width = next((w for w in (getattr(config, name, None) for name in ("intermediate_size", "d_ff", "encoder_ffn_dim"))
                  if w), 4 * h)
    return (h, heads, getattr(config, "head_dim", None) or getattr(config, "d_kv", None) or h // heads,
            getattr(config, "num_key_value_heads", None) or heads, width)


def fused_lm_head_bytes(config: Any, scored: int, device: str, backward: bool, bytes_per_value: int = 4) -> int:
    """TRL's fused LM head (`add_fused_lm_head`): log-probabilities of the labels computed in
    tiles of up to 4,096 tokens x 32,768 vocabulary entries, never the whole logits, for the
    `scored` positions only: those with a label (peftkit makes TRL skip the others on CPU too,
    `tasks.sft.score_answer_positions_only`); their final hidden states are gathered and kept
    for backward. On a GPU, Triton kernels fold each tile in place: one tile buffer in the
    compute dtype (`bytes_per_value`), and in backward the fp32 gradient of the hidden states.
    Without Triton (CPU) the tile is folded by torch operations. Forward: the tile, the scaled
    logits, and the exponentials with their product with the logits (4 tiles). Backward: the
    tile, the logits scaled twice (temperature and logit scale, each a new tensor), the
    log-probabilities, the probabilities, the gradient, the target mask (bool) and the two
    temporaries of `grad += g * (is_target.float() - p)` (8.25 tiles;
    trl.kernels.chunked_logprob._backward_tile)."""
    rows = min(scored, LOGPROB_TOKEN_CHUNK)
    if device == "cuda":  # the buffer is allocated 32,768 wide whatever the vocabulary
        return int(rows * LOGPROB_VOCAB_CHUNK * bytes_per_value
                   + scored * config.hidden_size * (bytes_per_value + (4 if backward else 0)))
    buffers = LM_HEAD_BACKWARD_BUFFERS if backward else LM_HEAD_FORWARD_BUFFERS
    return int(rows * min(config.vocab_size, LOGPROB_VOCAB_CHUNK) * 4 * buffers + scored * config.hidden_size * 4)


def kv_cache_bytes(config: Any, batch_size: int, seq_len: int, bytes_per_value: int) -> int:
    """Generation's key/value cache: every layer's keys and values for every token."""
    _, _, head_dim, kv, _ = model_sizes(config)
    return int(config.num_hidden_layers * 2 * kv * head_dim * batch_size * seq_len * bytes_per_value)


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


def estimate_run(config: Any, run: dict | None = None, device: str | None = None) -> Estimate:
    """`estimate` for a RunConfig's own settings: its batch sizes at its longest training and
    validation examples (length-grouped batches make those the peak batches), its dtype,
    precision, optimizer, attention kernel and switches, on the run's device (`device`, else
    the recorded one, else this machine's). Before a run the maximum length stands in for the
    longest examples, and for packed training rows, which fill it with many answers."""
    data = (run or {}).get("data", {})
    # an encoder-decoder's answers are its targets, before a run as long as they may be
    train_len = data.get("longest_train_example", config.max_length)
    train_answer = _answer_tokens(data, "train", config.batch_size) or config.max_target_length
    if config.packing:
        train_len, train_answer = config.max_length, None
    if device is None:
        recorded = (run or {}).get("device", "cuda" if torch.cuda.is_available() else "cpu")
        device = "cpu" if recorded.startswith("cpu") else "cuda"
    return estimate(config.model, config.strategy.build(), config.batch_size,
                    train_len, config.weights_dtype(device),
                    config.gradient_checkpointing, config.optimizer, num_labels=len(data.get("label_names", [0, 1])),
                    device=device, quantization=config.quantization, eval_batch_size=config.eval_batch_size,
                    eval_seq_len=data.get("longest_validation_example", config.max_length), task=config.task_kind,
                    max_new_tokens=config.max_new_tokens, precision=config.compute_precision(device),
                    attn_implementation=config.attn_implementation, keeps_best=config.select == "best",
                    answer_tokens=train_answer,
                    eval_answer_tokens=_answer_tokens(data, "eval", config.eval_batch_size) or config.max_target_length,
                    feature_rows=data.get("cached_feature_rows", 0) if config.cache_features else 0,
                    num_beams=config.num_beams or 1,
                    generation_batch=(batch["rows"], batch["prompt_tokens"]) if (batch := data.get("generation_batch")) else None,
                    accumulates_gradients=config.gradient_accumulation_steps > 1)


def _answer_tokens(data: dict, split: str, batch_size: int) -> int | None:
    """Labelled positions per example for a run's peak batch: the fullest batch's answer
    tokens spread over the batch (rounded up) where the task records them, else the longest
    answer (`Task.longest_answers`), else None."""
    fullest = data.get(f"fullest_{split}_batch_answers")
    return -(-fullest // batch_size) if fullest else data.get(f"longest_{split}_answer")


def estimate_for(config: Any, run: dict | None) -> dict:
    """`estimate_run` as a record field: the breakdown, or the error that stopped it."""
    try:
        return estimate_run(config, run).as_dict()
    except PeftkitError as err:
        return {"error": str(err)}
