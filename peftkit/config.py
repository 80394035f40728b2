"""The run configuration: the only place options are validated.

Recipes (YAML), CLI flags and the Python API all become a `RunConfig`, so a typo'd key, a
wrong type or an impossible combination is caught in one place, before any weight loads.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import os
from pathlib import Path
from typing import Any, Literal

import pydantic
import yaml
from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

from peftkit.errors import PeftkitError, did_you_mean
from peftkit.strategies import Strategy, build_strategy
from peftkit.tasks import resolve_task


class StrategySpec(BaseModel):
    """`lora`, or `{name: lora, r: 16}`: a registered strategy and its options."""

    model_config = ConfigDict(extra="forbid", arbitrary_types_allowed=True)
    name: str
    options: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _flatten(cls, value: Any) -> Any:
        if isinstance(value, str):
            return {"name": value}
        if isinstance(value, dict) and "options" not in value:
            rest = {k: v for k, v in value.items() if k != "name"}
            return {"name": value.get("name"), "options": rest}
        return value

    def build(self) -> Strategy:
        return build_strategy(self.name, self.options)

    @model_validator(mode="after")
    def _check(self) -> StrategySpec:
        self.options = self.build().options()  # validates, and records every default
        return self

    @model_serializer
    def _serialize(self) -> dict[str, Any]:
        return {"name": self.name, **self.options}


class RunConfig(BaseModel):
    """Everything one training run needs. Field names are the recipe keys and CLI flags."""

    model_config = ConfigDict(extra="forbid")

    # what to train: `task` is a built-in data set (sst2, sst2-chat, ...) or a task kind for
    # your own files (classification, sft); None means classification
    model: str = "minilm"
    task: str | None = "sst2"
    strategy: StrategySpec = Field(default_factory=lambda: StrategySpec(name="lora"))
    # how a head that reads one vector per example (classification) reads the model, under
    # every strategy alike (peftkit.pooling): model (BERT's [CLS] pooler, a decoder's last
    # token) or mean (the masked mean of the last hidden states). auto: what the checkpoint
    # declares, mean for a sentence-transformers model that mean-pools (MiniLM), else model
    pooling: Literal["auto", "model", "mean"] = "auto"
    # data
    data_dir: Path | None = None
    train_file: Path | None = None
    validation_file: Path | None = None
    test_file: Path | None = None                # scored once at the end, like validation (DIR/<task>/test.jsonl too)
    text_columns: list[str] | None = None        # classification
    label_column: str | None = None
    messages_column: str | None = None           # sft: chat messages ...
    prompt_column: str | None = None             # ... or a prompt and a completion
    completion_column: str | None = None
    chat_template: str | None = None             # sft: a Jinja file or template text (default: the model's own)
    prompt_template: str | None = None           # sft: the user turn made of a prompt column, "{prompt}" marking it
    references_column: str | None = None         # sft, seq2seq: a list of reference texts per example to score against
    tokens_column: str | None = None             # token classification: a list of words per example ...
    tags_column: str | None = None               # ... and one tag per word (strings, or integers ...
    tag_names: list[str] | None = None           # ... named by these, in order)
    question_column: str | None = None           # extractive QA (default: SQuAD's question, context, answers)
    context_column: str | None = None
    answers_column: str | None = None
    source_column: str | None = None             # seq2seq (default: source, target)
    target_column: str | None = None
    source_prefix: str | None = None             # seq2seq: put before every source, e.g. "summarize: " for T5
    max_target_length: int | None = Field(default=None, ge=1)  # seq2seq: target tokens kept (128)
    num_beams: int | None = Field(default=None, ge=1)  # seq2seq generation: 1 is greedy
    doc_stride: int | None = Field(default=None, ge=0)  # QA: tokens neighbouring context windows share (a third of max_length)
    max_train_samples: int | None = Field(default=None, ge=1)
    max_eval_samples: int | None = Field(default=None, ge=1)
    max_length: int | None = Field(default=None, ge=8)  # None: the task's default (128 classification, 1024 sft)
    packing: bool = False                        # sft: pack examples into rows, never attending across them
    # sft evaluation: greedy generation on the validation prompts (0 generates none)
    max_new_tokens: int = Field(default=64, ge=1)
    max_generate_samples: int | None = Field(default=None, ge=0)
    # optimisation
    epochs: float = Field(default=3.0, gt=0)
    learning_rate: float | None = Field(default=None, gt=0)
    batch_size: int = Field(default=32, ge=1)
    eval_batch_size: int = Field(default=256, ge=1)
    gradient_accumulation_steps: int = Field(default=1, ge=1)
    weight_decay: float = Field(default=0.01, ge=0)
    warmup_ratio: float = Field(default=0.06, ge=0, lt=1)
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = "linear"
    early_stopping_patience: int | None = Field(default=None, ge=1)
    # Which weights are kept: "best" evaluates every epoch on a slice held out from the training
    # data (`selection_fraction`, stratified by label where there are labels, drawn with the
    # seed) and keeps the best; "last" keeps the final weights. The validation split (and a
    # test split) is scored once, at the end: never chosen on.
    select: Literal["best", "last"] = "best"
    selection_fraction: float = Field(default=0.1, gt=0, lt=1)
    metric_for_best_model: str | None = None     # None: the task's (accuracy, or loss for sft)
    seed: int = 0
    # autocast dtype of the computation; auto: the weights' dtype when it is bf16/fp16, else the
    # device's native half precision: bf16 (or fp16) on a GPU, bf16 on a CPU with bf16 dot-product
    # instructions (AVX512-BF16 or AMX), else fp32
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # dtype of the frozen weights (and of 4-bit layers' computation); trainable weights stay fp32.
    # auto: bf16 where the device computes it natively (see precision), else fp32
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    # memory switches (peftkit estimate counts each)
    optimizer: Literal["adamw", "adamw-8bit", "paged-adamw-8bit", "paged-adamw-32bit", "sgd", "adafactor"] = "adamw"
    max_grad_norm: float = Field(default=1.0, ge=0)  # 0: no clipping
    # auto: transformers' choice (sdpa where the model has it), computed in fp32 on a CPU under
    # bf16/fp16 (peftkit.cpu_attention); sdpa: transformers' sdpa in the run's own precision
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = "auto"
    torch_compile: bool = False
    gradient_checkpointing: bool = False
    # load the frozen base in 4 bits (bitsandbytes) under any strategy that adds weights
    quantization: Literal["none", "nf4", "fp4"] = "none"
    group_by_length: bool = True
    # CPU training: dropout layers draw their masks from numpy's PCG64 (peftkit.cpu_dropout),
    # several times faster than torch's CPU generator; false keeps torch's dropout
    fast_cpu_dropout: bool = True
    # CPU: blocks of this size or more get their own mapping, returned when freed (peftkit.allocator);
    # 0 keeps glibc's own, faster policy. `peftkit compare` uses 1024, so published peaks follow memory in use.
    cpu_mmap_threshold_kb: int = Field(default=0, ge=0)
    # frozen computation done once: the encoder under linear-probe, a dropout-free frozen bottom
    cache_features: bool = True
    # checkpoints while training (beside output_dir, removed when the run finishes): per epoch,
    # every save_steps steps, or none; the newest save_total_limit kept; resume continues the last
    save_strategy: Literal["epoch", "steps", "no"] = "epoch"
    save_steps: int = Field(default=500, ge=1)
    save_total_limit: int = Field(default=1, ge=1)
    resume: bool = False
    # where results go
    output_dir: Path | None = None
    overwrite: bool = False
    # run even when peftkit estimate says the run needs more memory than the device has free
    force: bool = False

    @model_validator(mode="after")
    def _check(self) -> RunConfig:
        if self.text_columns is not None and not 1 <= len(self.text_columns) <= 2:
            raise ValueError("text_columns takes one column (single text) or two (a sentence pair)")
        if self.train_file is None and self.validation_file is not None:
            raise ValueError("validation_file needs train_file too")
        if self.train_file is not None and self.validation_file is None:
            raise ValueError("train_file needs validation_file too (pass --validation-file)")
        if self.test_file is not None and self.train_file is None:
            raise ValueError("test_file goes with your own train_file and validation_file")
        if self.resume and self.overwrite:
            raise ValueError("resume continues an interrupted run and overwrite starts over: pass one of them")
        if self.resume and self.save_strategy == "no":
            raise ValueError("resume needs the checkpoints that save_strategy no turns off")
        if self.early_stopping_patience is not None and self.select == "last":
            raise ValueError("early_stopping_patience needs select=best: with select=last nothing is evaluated before the end")
        if self.train_file is None and self.task is None:
            raise ValueError("give a built-in task (--task sst2) or your own data (--train-file/--validation-file)")
        if self.attn_implementation == "flash_attention_2" and importlib.util.find_spec("flash_attn") is None:
            raise ValueError("attn_implementation flash_attention_2 needs the flash-attn package (a CUDA GPU): "
                             "pip install flash-attn, or use sdpa")
        half = self.dtype  # auto resolves to a dtype that never contradicts precision: no device to ask here
        if half in ("bf16", "fp16") and self.precision not in ("auto", half):
            raise ValueError(f"dtype {half} needs precision {half} (or auto): trainable fp32 weights meet the "
                             f"{half} base under autocast")
        strategy = self.strategy.build()
        strategy.check_quantization(self.quantization)
        task = self.task_kind
        _check_column_options(self, task)
        task.check_strategy(strategy)
        if self.metric_for_best_model is None:
            self.metric_for_best_model = task.selects
        elif self.metric_for_best_model not in task.metrics:
            raise ValueError(f"metric_for_best_model '{self.metric_for_best_model}' is not a metric of task "
                             f"'{task.name}': choose one of {', '.join(task.metrics)}")
        if self.max_length is None:
            self.max_length = task.default_max_length
        from peftkit.sources import declared_pooling

        check_pooling(self.pooling, task)
        if self.pooling == "auto":
            self.pooling = declared_pooling(self.model) if task.reads_one_vector else "model"
        task.check_config(self, strategy)
        if self.data_dir is None and os.environ.get("PEFTKIT_DATA_DIR"):
            self.data_dir = Path(os.environ["PEFTKIT_DATA_DIR"])
        for name in ("data_dir", "train_file", "validation_file", "test_file"):
            if getattr(self, name) is not None:  # recorded absolute: `peftkit eval` may run elsewhere
                setattr(self, name, getattr(self, name).expanduser().absolute())
        if self.output_dir is None:
            self.output_dir = Path("runs") / f"{Path(self.model).name}-{self.task or 'custom'}-{self.strategy.name}-seed{self.seed}"
        return self

    @property
    def task_name(self) -> str:
        return self.task or "classification"

    @property
    def task_kind(self) -> Any:
        """The registered Task this run trains (`peftkit.tasks`)."""
        return resolve_task(self.task_name)[0]

    def weights_dtype(self, device: str | None = None) -> str:
        """`dtype` resolved on `device` (default: this machine's): auto is bf16 where the device
        computes bf16 natively, fp32 elsewhere, and there follows an explicit `precision` (never
        contradicts it)."""
        if self.dtype != "auto":
            return self.dtype
        native = "bf16" if native_precision(device) == "bf16" else "fp32"
        return native if native == "fp32" or self.precision == "auto" else self.precision

    def compute_precision(self, device: str | None = None) -> str:
        """`precision` resolved on `device`: auto follows a half-precision `dtype`, else is the
        device's native precision (`native_precision`)."""
        if self.precision != "auto":
            return self.precision
        if self.dtype in ("bf16", "fp16"):
            return self.dtype
        return native_precision(device)

    @property
    def lr(self) -> float:
        """The learning rate in force: the one given, else the strategy's own default."""
        return self.learning_rate if self.learning_rate is not None else self.strategy.build().default_lr


def native_precision(device: str | None = None) -> str:
    """The precision `auto` means on `device` (default: this machine's). On a CUDA GPU: bf16
    where it is supported (assumed for a device named "cuda" that is not here, as in a dry run),
    else fp16. On CPU: bf16 where the CPU has bf16 dot-product instructions (AVX512-BF16 or AMX:
    oneDNN's bf16 matrix products then run up to twice as fast as fp32 ones), else fp32.
    PEFTKIT_CPU_BF16=0 (or 1) overrides the CPU's detection, for results that must not depend
    on which CPU ran them."""
    import torch

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return "bf16" if cpu_has_bf16() else "fp32"
    if torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
        return "fp16"
    return "bf16"


def cpu_has_bf16() -> bool:
    """Whether this CPU computes bf16 natively (PEFTKIT_CPU_BF16=0/1 decides where it is set)."""
    import torch

    forced = os.environ.get("PEFTKIT_CPU_BF16", "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    if forced:
        raise PeftkitError(f"PEFTKIT_CPU_BF16 must be 0 or 1, not {forced!r}: set one of those, or unset "
                           "it to let peftkit detect the CPU's bf16 support")
    capabilities = torch.cpu.get_capabilities()
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def check_pooling(pooling: str, task: Any) -> None:
    """Refuse mean pooling for a task whose head reads every token (before anything loads)."""
    if pooling == "mean" and not task.reads_one_vector:
        raise PeftkitError(f"pooling=mean makes one vector per example, and task '{task.name}' reads every token: "
                           "use pooling=model (or auto)")


GENERATION_OPTIONS = ("max_new_tokens", "max_generate_samples")  # read only by tasks that generate text


def _check_column_options(config: RunConfig, task: Any) -> None:
    """A column option of another task kind (`tokens_column` on sst2), or a generation
    setting on a task that generates nothing, is a mistake: say whose it is."""
    from peftkit.tasks import TASKS

    for other in TASKS.values():
        for name in other.column_options:
            if name not in task.column_options and getattr(config, name) != RunConfig.model_fields[name].default:
                raise ValueError(f"{name} is an option of task '{other.name}', and this run's task is "
                                 f"'{task.name}': drop it or pick a {other.name} task")
    for name in GENERATION_OPTIONS:
        if getattr(config, name) != RunConfig.model_fields[name].default and not task.generates_text:
            raise ValueError(f"{name} sets how answers are generated, and task '{task.name}' generates no text: drop it")


def config_values(record: dict[str, Any]) -> dict[str, Any]:
    """A run record's config as today's RunConfig reads it. Records from before `pooling` was
    a run setting kept it among a strategy's options, or (strategies without the option) read
    the model its own way: both say so explicitly now, so that auto does not reread them."""
    values = dict(record["config"])
    if "pooling" not in values:
        strategy = values.get("strategy")
        if isinstance(strategy, dict) and "pooling" in strategy:
            strategy = dict(strategy)
            values["pooling"] = strategy.pop("pooling")
            values["strategy"] = strategy
        else:
            values["pooling"] = "model"
    return values


def make_config(values: dict[str, Any]) -> RunConfig:
    """Validate a dict into a RunConfig, turning pydantic's report into one clear line."""
    try:
        return RunConfig.model_validate(values)
    except pydantic.ValidationError as err:
        raise PeftkitError(explain(err)) from None


def explain(err: pydantic.ValidationError) -> str:
    """One line for the first problem in a pydantic error, with a suggestion for typos."""
    first = err.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    if first["type"] == "extra_forbidden":
        key = str(first["loc"][-1])
        return f"unknown option '{loc}'{did_you_mean(key, RunConfig.model_fields)}"
    message = first["msg"].removeprefix("Value error, ")
    return f"option '{loc}': {message}" if loc else message


def load_recipe(path: Path) -> dict[str, Any]:
    """Read a YAML recipe into a plain dict (validated later, together with any --set)."""
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as err:
        raise PeftkitError(f"cannot read recipe {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise PeftkitError(f"recipe {path} is not valid YAML{_where(err)}: {_yaml_problem(err)}") from None
    if not isinstance(data, dict):
        raise PeftkitError(f"recipe {path} must be a mapping of option: value")
    return data


def _where(err: yaml.YAMLError) -> str:
    """' at line L, column C' of a YAML error (1-based, as editors count), where it has a place."""
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    return f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""


def _yaml_problem(err: yaml.YAMLError) -> str:
    """What the YAML parser found wrong, in its own words, without its multi-line excerpt."""
    parts = [getattr(err, "context", None), getattr(err, "problem", None)]
    return "; ".join(p for p in parts if p) or str(err).splitlines()[0]


def apply_overrides(values: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key=value` overrides. Values are read as YAML (16 -> int, [a,b] -> list).
    `strategy.r=16` or plain `r=16` (any key that is not a run option) set strategy options."""
    values = dict(values)
    strategy = values.get("strategy", "lora")
    if not isinstance(strategy, (str, dict)):
        raise PeftkitError(f"option 'strategy' must be a name (lora) or a mapping ({{name: lora, r: 16}}), got {strategy!r}")
    strategy = {"name": strategy} if isinstance(strategy, str) else dict(strategy)
    plain: list[str] = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise PeftkitError(f"--set expects key=value, got '{item}'")
        value = _yaml_or_text(raw)
        if key == "strategy":
            strategy = {"name": value}
        elif key.startswith("strategy."):
            strategy[key.removeprefix("strategy.")] = value
        elif key in RunConfig.model_fields:
            values[key] = value
        else:
            strategy[key] = value
            plain.append(key)
    _check_plain_keys(plain, strategy.get("name"))
    values["strategy"] = strategy
    return values


def _check_plain_keys(keys: list[str], strategy_name: Any) -> None:
    """A plain `--set key=value` that is no option of the strategy but close to a run option
    is a typo of that run option (`lerning_rate`), not a strategy option: say so."""
    from peftkit.strategies import STRATEGIES

    cls = STRATEGIES.get(strategy_name) if isinstance(strategy_name, str) else None
    if cls is None:
        return  # peft:<method> and unknown names are checked where the strategy is built
    options = {f.name for f in dataclasses.fields(cls)}

    def best(key: str, names: Any) -> tuple[float, str]:
        return max(((difflib.SequenceMatcher(None, key, n).ratio(), n) for n in names), default=(0.0, ""))

    for key in keys:
        score, run_option = best(key, RunConfig.model_fields)
        if key not in options and score >= 0.8 and score > best(key, options)[0]:
            raise PeftkitError(f"unknown option '{key}' (did you mean '{run_option}'?)")


def _yaml_or_text(raw: str) -> Any:
    """A `--set` value read as YAML (16 -> int, [a,b] -> list), or as plain text when it is
    not YAML (a Jinja chat template, say)."""
    if not raw:
        return ""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
