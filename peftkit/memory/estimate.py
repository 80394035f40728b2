"""The memory estimate's public API: peak memory of a training run from the model's config
alone (`estimate`, `estimate_run` for a run's own settings), as an `Estimate`, a breakdown in
bytes by term.

Terms, each from the model built on the meta device as the strategy would train it
(`peftkit.memory.meta`): `weights`, `gradients` and both ends of backward
(`peftkit.memory.weights`), `optimizer` (`peftkit.memory.optimizer`), `best_weights` (peftkit
keeps a copy of the trainable tensors at the best evaluation, 4 bytes each, unless the run
keeps its last weights, `select: last`), `activations` (`peftkit.memory.activations`),
`evaluation` (`peftkit.memory.evaluation`), an encoder-decoder's two stacks instead
(`peftkit.memory.encoder_decoder`), the task's output layer (`Task.output_memory`: the fused
LM head, `peftkit.memory.heads`; a generation cache, `peftkit.memory.generation`), `runtime`
(on CPU, what the process holds besides tensors: tokenizer, data, Trainer) and
`cached_features` (a linear probe on cached features keeps one fp32 hidden-size vector per
training and selection example, or per labelled token for NER, while its head trains; the
count comes from the run's data, so `peftkit estimate` alone leaves it out).

The phases never coexist: training, evaluation and generation each free what the one before
held, so only the largest counts (`Estimate.total_bytes`). docs/estimate.md explains each term
and the measurements that check it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from peftkit.anatomy import head_is_one_linear
from peftkit.cpu.attention import can_use_fp32_cpu_attention
from peftkit.errors import PeftkitError
from peftkit.memory import activations, encoder_decoder, evaluation
from peftkit.memory.meta import load_config, meta_model
from peftkit.memory.optimizer import OPTIMIZERS, optimizer_bytes
from peftkit.memory.sizes import DTYPE_BYTES, model_sizes
from peftkit.memory.weights import backward_gradient_terms, weight_bytes
from peftkit.precision import native_precision
from peftkit.strategies import Strategy, build_strategy
from peftkit.tasks import Task, resolve_task

GB = 1024**3
FIT_SIZES_GB = (16, 24, 40, 80)
CPU_RUNTIME_BYTES = 128 * 2**20   # measured: resident memory a CPU run adds beyond its tensors (docs/estimate.md)
TRAINING_TERMS = ("activations", "output_layer", "gradients", "gradients_at_backward_start", "tied_gradient_copies")
EVALUATION_TERMS = ("evaluation", "evaluation_output")
GENERATION_TERMS = ("generation_forward", "generation_cache")
PHASES = (TRAINING_TERMS, EVALUATION_TERMS, GENERATION_TERMS)

__all__ = ["CPU_RUNTIME_BYTES", "EVALUATION_TERMS", "FIT_SIZES_GB", "GB", "GENERATION_TERMS", "PHASES", "TRAINING_TERMS",
           "Estimate", "estimate", "estimate_for", "estimate_run", "load_config"]


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
        gradients appear as backward frees the activations (`peftkit.memory.weights`), so a
        step holds the larger of backward's start and end; evaluation runs its layers' forward
        pass, then the output layer's loss (or an encoder-decoder's generation), so only the
        larger of the two; generation holds the key/value cache while its prompts' forward
        pass runs."""
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
    task = resolve_task(task)[0] if isinstance(task, str) else task
    batch_size, eval_batch_size = batch_size * task.rows_per_example, eval_batch_size * task.rows_per_example
    if dtype == "auto":
        dtype = "fp32" if native_precision(device) == "fp32" else "bf16"
    precision = precision or dtype
    for name, value in (("dtype", dtype), ("precision", precision)):
        if value not in DTYPE_BYTES:
            raise PeftkitError(f"unknown {name} '{value}': choose one of {', '.join(DTYPE_BYTES)}")
    if optimizer not in OPTIMIZERS:
        raise PeftkitError(f"unknown optimizer '{optimizer}': choose one of {', '.join(OPTIMIZERS)}")
    strategy = build_strategy(strategy) if isinstance(strategy, str) else strategy
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
        # a frozen copy for methods that hold the policy to a reference an adapter cannot stand in for
        "reference_model": weight_bytes(meta, False, DTYPE_BYTES[dtype], False) if task.keeps_reference(strategy) else 0,
        "runtime": CPU_RUNTIME_BYTES if device == "cpu" else 0,
        "cached_features": 4 * feature_rows * model_sizes(config)[0] if strategy.frozen_below_head and head_is_one_linear(meta) else 0,
    }
    if not strategy.trains_anything:  # the untuned model is only evaluated: no training phase
        terms.update(dict.fromkeys(TRAINING_TERMS, 0))
    if "generation_cache" in terms:
        rows, prompt = generation_batch
        terms["generation_forward"] = evaluation.evaluation_bytes(meta, config, strategy, rows * num_beams, prompt,
                                                                  values_bytes)
    total = sum(p.numel() for p in meta.parameters())  # logical values, 4-bit ones included
    per_example = task.rows_per_example  # the settings say the batch in examples, as given
    settings = {"model": model, "task": task.name, "strategy": strategy.name, "batch_size": batch_size // per_example,
                "seq_len": seq_len, "dtype": dtype, "precision": precision, "attn_implementation": attn_implementation,
                "gradient_checkpointing": gradient_checkpointing, "optimizer": optimizer, "device": device,
                "quantization": getattr(strategy, "quant_type", "nf4") if quantized and quantization == "none" else quantization,
                "eval_batch_size": eval_batch_size // per_example, "eval_seq_len": eval_seq_len, "answer_tokens": answer_tokens,
                "num_beams": num_beams, "accumulates_gradients": accumulates_gradients}
    return Estimate(terms, trainable, total, settings)


def _layer_terms(meta: Any, config: Any, strategy: Strategy, batch_size: int, seq_len: int, eval_batch_size: int,
                 eval_seq_len: int, values_bytes: int, gradient_checkpointing: bool, device: str,
                 answer_tokens: int | None, eval_answer_tokens: int | None, attention_bytes: int) -> dict[str, int]:
    """The layers' `activations` and `evaluation` terms: one stack, or an encoder-decoder's two
    (`peftkit.memory.encoder_decoder`), whose `seq_len` is the source's and whose answer
    tokens are the target's (default: as long as the source)."""
    if getattr(config, "is_encoder_decoder", False):
        return {"activations": encoder_decoder.activation_bytes(meta, config, strategy, batch_size, seq_len,
                                                                answer_tokens or seq_len, values_bytes,
                                                                gradient_checkpointing, device, attention_bytes),
                "evaluation": encoder_decoder.evaluation_bytes(meta, config, strategy, eval_batch_size, eval_seq_len,
                                                               eval_answer_tokens or eval_seq_len, values_bytes)}
    return {"activations": activations.activation_bytes(meta, config, strategy, batch_size, seq_len, values_bytes,
                                                        gradient_checkpointing, device, attention_bytes),
            "evaluation": evaluation.evaluation_bytes(meta, config, strategy, eval_batch_size, eval_seq_len,
                                                      values_bytes)}


def attention_value_bytes(model: Any, device: str, precision: str, attn_implementation: str) -> int:
    """Bytes per value the attention kernel keeps for backward: 4 where peftkit computes SDPA
    in fp32 (on CPU under bf16/fp16 with `attn_implementation` auto, a model that can switch:
    `peftkit.cpu.attention`), else the activations' own."""
    fp32_on_cpu = device == "cpu" and precision != "fp32" and attn_implementation == "auto"
    return 4 if fp32_on_cpu and can_use_fp32_cpu_attention(model) else DTYPE_BYTES[precision]


def estimate_run(config: Any, run: dict | None = None, device: str | None = None) -> Estimate:
    """`estimate` for a run's config (a resolved RunConfig) and its own settings: its batch
    sizes at its longest training and validation examples (length-grouped batches make those
    the peak batches), its dtype, precision, optimizer, attention kernel and switches, on the
    run's device (`device`, else the recorded one, else this machine's). Before a run the
    maximum length stands in for the longest examples, and for packed training rows, which
    fill it with many answers. The task's own options (generation, targets, packing) come
    from the task (`Task.estimate_options`)."""
    data = (run or {}).get("data", {})
    task = config.task_kind
    own = task.estimate_options(config)
    # an encoder-decoder's answers are its targets, before a run as long as they may be
    train_len = data.get("longest_train_example", config.max_length)
    train_answer = _answer_tokens(data, "train", config.batch_size) or own["max_target_length"]
    if own["packing"]:
        train_len, train_answer = config.max_length, None
    if device is None:
        recorded = (run or {}).get("device", "cuda" if torch.cuda.is_available() else "cpu")
        device = "cpu" if recorded.startswith("cpu") else "cuda"
    return estimate(config.model, config.build_strategy(), config.batch_size,
                    train_len, config.weights_dtype(device),
                    config.gradient_checkpointing, config.optimizer, num_labels=len(data.get("label_names", [0, 1])),
                    device=device, quantization=config.quantization, eval_batch_size=config.eval_batch_size,
                    eval_seq_len=data.get("longest_validation_example", config.max_length), task=task,
                    max_new_tokens=own["max_new_tokens"], precision=config.compute_precision(device),
                    attn_implementation=config.attn_implementation, keeps_best=config.select == "best",
                    answer_tokens=train_answer,
                    eval_answer_tokens=_answer_tokens(data, "eval", config.eval_batch_size) or own["max_target_length"],
                    feature_rows=data.get("cached_feature_rows", 0) if config.cache_features else 0,
                    num_beams=own["num_beams"],
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
