"""The model a run trains or reloads: its base as the run's options load it (dtype,
attention kernel, 4-bit), where that base comes from (`init_from`: a finished run's model),
and a finished run reloaded with its strategy's weights.

`init_from` starts a run from a finished run's model, which is also its reference: SFT then
DPO (or GRPO) is two commands. The earlier run's model becomes the new run's base as a plain
transformers checkpoint: a PEFT adapter is merged into its base once (kept in peftkit's cache
under the run's config hash), and a run that saved its whole model is read where it is. Every
strategy then applies to that base as to any other, so with an adapter the reference (the
adapter disabled) is the earlier run's model, and with full fine-tuning the frozen copy TRL
loads is.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftkit.cpu.attention import use_fp32_cpu_attention
from peftkit.errors import PeftkitError
from peftkit.models import (ModelSource, cache_dir, four_bit_config, keep_4bit_training_layout, keep_trainable_fp32,
                            resolve_model)
from peftkit.options import RunConfig
from peftkit.pooling import read_with
from peftkit.record import RunRecord, read_record
from peftkit.resolve import config_from_record
from peftkit.strategies.peft_base import first_line
from peftkit.tasks import TASKS
from peftkit.trainer import torch_dtype

MERGED_NOTE = "merged-from.txt"  # written last into a merged init_from checkpoint: it is complete


def weight_options(config: RunConfig) -> dict[str, Any]:
    """How the base's weights load: its `dtype`, and the attention kernel (None: transformers' choice)."""
    attention = None if config.attn_implementation == "auto" else config.attn_implementation
    return {"dtype": torch_dtype(config.weights_dtype()), "attn_implementation": attention}


def load_base(config: RunConfig, task: Any, source: Any, info: dict[str, Any], tokenizer: Any,
              quantization: Any) -> nn.Module:
    """The task's base model as `weight_options` load it; with `attn_implementation` auto on a
    CPU computing in bf16/fp16, its SDPA attention computes in fp32 (`peftkit.cpu.attention`:
    several times faster there than bf16's)."""
    model = task.load_model(source, info, tokenizer, quantization, **weight_options(config))
    if config.attn_implementation == "auto" and not torch.cuda.is_available() and config.compute_precision() != "fp32":
        use_fp32_cpu_attention(model)
    return model


def base_quantization(config: RunConfig, strategy: Any) -> Any | None:
    """How the frozen base loads: as the strategy demands (qlora), else as the run's
    `quantization` option says (4-bit NF4/FP4 with double quantization), else unquantized.
    4-bit layers compute in the weights' dtype when it is half precision, else in the run's."""
    weights = config.weights_dtype()
    dtype = torch_dtype(weights if weights != "fp32" else config.compute_precision())
    own = strategy.quantization_config(dtype)
    if own is not None or config.quantization == "none":
        return own
    return four_bit_config(config.quantization, True, dtype)


def load_run(run_dir: Path, *, quantized: bool = True, **overrides: Any) -> tuple[RunConfig, nn.Module, Any, RunRecord]:
    """Reload a finished run: (config, model in eval mode, tokenizer, record). `quantized=False`
    puts a QLoRA run's adapter on the unquantized base (what `peftkit merge` folds it into)."""
    record = read_record(run_dir)
    config = config_from_record(record, **overrides)
    strategy = config.build_strategy()
    task = config.task_kind
    source = starting_source(config, resolve_model(config.model))
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    quantization = base_quantization(config, strategy) if quantized else None
    base = load_base(config, task, source, record.data, tokenizer, quantization)
    model = read_with(config.pooling, base, lambda plain: strategy.load(plain, Path(run_dir), task))
    model = keep_4bit_training_layout(keep_trainable_fp32(model))
    model.eval()
    return config, model, tokenizer, record


def starting_source(config: Any, source: ModelSource) -> ModelSource:
    """The model a run starts from: `source`, or the finished run its `init_from` names, as a
    plain checkpoint (merged into the cache on first use; later uses and reloads read it)."""
    run_dir = getattr(config, "init_from", None)  # only the tasks whose group has InitFromOptions
    if run_dir is None:
        return source
    run_dir = Path(run_dir).expanduser()
    record = check_init_from(run_dir, config)
    if record.saved_as == "whole-model":
        return ModelSource(source.name, str(run_dir.resolve()), "local")
    trained = record.provenance.config_hash if record.provenance else ""
    key = hashlib.sha256(f"{run_dir.resolve()}:{trained}".encode()).hexdigest()[:16]
    merged = cache_dir() / "init-from" / key
    if not (merged / MERGED_NOTE).is_file():
        print(f"init_from: merging {run_dir} into a plain checkpoint at {merged}", flush=True)
        save_merged(run_dir, merged)
    return ModelSource(source.name, str(merged), "local")


def merged_model(run_dir: Path, **overrides: Any) -> tuple[RunConfig, nn.Module, Any]:
    """A PEFT run's adapter folded into its freshly loaded, unquantized base (`peftkit merge`
    and `init_from`): (config, plain model, tokenizer). A method or layer PEFT cannot merge is
    refused in one line."""
    config, model, tokenizer, _ = load_run(run_dir, quantized=False, **overrides)
    try:
        return config, model.merge_and_unload(), tokenizer
    except (NotImplementedError, ValueError) as err:  # PEFT: a method or layer without a merge
        raise PeftkitError(f"strategy {config.strategy.name} cannot be merged: {first_line(err)}") from None


def save_merged(run_dir: Path, directory: Path) -> None:
    """The merged run saved as a plain checkpoint, its note written last (a partial one is redone)."""
    _, model, tokenizer = merged_model(run_dir)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    (directory / MERGED_NOTE).write_text(f"{Path(run_dir).resolve()}\n")


def check_init_from(run_dir: Path, config: Any) -> Any:
    """The run `init_from` names, checked from its record alone: a finished run of a causal LM,
    of the same model, whose weights become plain transformers weights."""
    if not run_dir.is_dir():
        raise PeftkitError(f"init_from {run_dir} is not a directory: name a finished peftkit run")
    record = read_record(run_dir)
    if record.config.get("model") != config.model and resolve_model(str(record.config.get("model"))).path != \
            resolve_model(config.model).path:
        raise PeftkitError(f"init_from {run_dir} trained model {record.config.get('model')}, and this run is of "
                           f"{config.model}: give --model {record.config.get('model')}")
    causal = [name for name, task in TASKS.items() if task.model_class == "AutoModelForCausalLM"]
    if record.task_kind not in causal:  # a classifier's or reward model's head is no LM head to continue from
        raise PeftkitError(f"init_from {run_dir} is a {record.task_kind} run: start from a run of a causal LM task "
                           f"({', '.join(causal)})")
    if record.saved_as not in ("peft", "whole-model"):
        raise PeftkitError(f"init_from {run_dir} saved its strategy's own tensors ({record.config['strategy']['name']}), "
                           "which plain transformers weights cannot hold: start from a PEFT or fine-tuning run")
    return record
