"""The options every run has, whatever its task and strategy: the model, the data's place,
optimisation, precision, memory switches, checkpoints and where results go.

Each field's `description` is its only documentation: `peftkit train --help`, error messages
and the docs' option reference all read it from here.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_serializer, model_validator

Precision = Literal["auto", "fp32", "bf16", "fp16"]


class StrategySpec(BaseModel):
    """`lora`, or `{name: lora, r: 16}`: a registered strategy's name and its options, as
    plain data (the strategy itself is built by `peftkit.resolve`, which checks the options
    against the strategy's own fields)."""

    model_config = ConfigDict(extra="forbid")
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

    @model_serializer
    def _serialize(self) -> dict[str, Any]:
        return {"name": self.name, **self.options}


class CommonOptions(BaseModel):
    """The options of every run. Field names are the recipe keys and the CLI's flags."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field("minilm", description="Hub id, local checkpoint directory, or packaged alias (minilm, "
                                             "smollm2-135m, tiny-bert, tiny-llama, tiny-t5).")
    task: str | None = Field("sst2", description="A built-in data set, or a task kind for your own files "
                                                 "(none: classification).")
    strategy: StrategySpec = Field(default_factory=lambda: StrategySpec(name="lora"),
                                   description="The strategy, by name; its options go in a recipe's strategy "
                                               "mapping or --set (`peftkit strategies` lists them; none: evaluate "
                                               "the untuned model).")
    pooling: Literal["auto", "model", "mean"] = Field(
        "auto", description="How a head that reads one vector per example (classification) reads the model, under "
                            "every strategy alike: model (BERT's [CLS] pooler, a decoder's last token) or mean (the "
                            "masked mean of the last hidden states); auto: what the checkpoint declares (mean for a "
                            "sentence-transformers model that mean-pools, such as MiniLM), else model.")
    # data
    data_dir: Path | None = Field(None, description="Directory with <task>/{train,validation}.jsonl for a built-in "
                                                    "data set (default: $PEFTKIT_DATA_DIR).")
    train_file: Path | None = Field(None, description="Your own training data (.jsonl, .csv or .parquet); needs "
                                                      "validation_file too.")
    validation_file: Path | None = Field(None, description="Your own validation data, scored once at the end.")
    test_file: Path | None = Field(None, description="Your own test data, scored once at the end like validation "
                                                     "(a built-in data set's DIR/<task>/test.jsonl is read when there).")
    max_train_samples: int | None = Field(None, ge=1, description="Use the first N training examples.")
    max_eval_samples: int | None = Field(None, ge=1, description="Use the first N validation examples.")
    max_length: int | None = Field(None, ge=8, description="Truncate inputs to N tokens (default: the task's: 128 "
                                                           "classification, 384 qa, 1024 sft, ...).")
    # optimisation
    epochs: float = Field(3.0, gt=0, description="Training epochs (a fraction stops part-way).")
    learning_rate: float | None = Field(None, gt=0, description="Peak learning rate (default: the strategy's own).",
                                        json_schema_extra={"flags": ["--learning-rate", "--lr"]})
    batch_size: int = Field(32, ge=1, description="Examples per optimizer micro-step.")
    eval_batch_size: int = Field(256, ge=1, description="Examples per evaluation batch.")
    gradient_accumulation_steps: int = Field(1, ge=1, description="Micro-steps per optimizer step.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW's weight decay (never on biases, norms, DoRA "
                                                        "magnitudes or IA3 scales).")
    warmup_ratio: float = Field(0.06, ge=0, lt=1, description="Fraction of the training steps spent warming up.")
    lr_scheduler: Literal["linear", "cosine", "constant", "constant_with_warmup"] = Field(
        "linear", description="The learning rate's schedule after warm-up.")
    early_stopping_patience: int | None = Field(None, ge=1, description="Stop after N evaluations without "
                                                                        "improvement (needs select best).")
    select: Literal["best", "last"] = Field(
        "best", description="Which weights are kept: best evaluates every epoch on a slice held out from the "
                            "training data (selection_fraction, stratified by label where there are labels, drawn "
                            "with the seed) and keeps the best; last keeps the final weights. The validation (and "
                            "test) split is scored once, at the end: never chosen on.")
    selection_fraction: float = Field(0.1, gt=0, lt=1, description="Fraction of the training data held out to "
                                                                    "choose the best epoch on.")
    metric_for_best_model: str | None = Field(None, description="The metric that chooses the best epoch "
                                                                "(default: the task's: accuracy, or loss for sft).")
    seed: int = Field(0, description="Random seed (data order, the held-out slice, new weights).")
    # precision
    precision: Precision = Field(
        "auto", description="Autocast dtype of the computation; auto: the weights' dtype when it is bf16/fp16, else "
                            "the device's native half precision: bf16 (or fp16) on a GPU, bf16 on a CPU with bf16 "
                            "dot-product instructions (AVX512-BF16 or AMX), else fp32.")
    dtype: Precision = Field(
        "auto", description="Dtype of the frozen weights (and of 4-bit layers' computation); trainable weights stay "
                            "fp32. auto: bf16 where the device computes it natively (see precision), else fp32.")
    # memory switches (peftkit estimate counts each)
    optimizer: Literal["adamw", "adamw-8bit", "paged-adamw-8bit", "paged-adamw-32bit", "sgd", "adafactor"] = Field(
        "adamw", description="The optimizer (the 8-bit and paged ones are bitsandbytes').")
    max_grad_norm: float = Field(1.0, ge=0, description="Clip gradients to this norm (0: no clipping).")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field(
        "auto", description="Attention kernel. auto: transformers' choice (sdpa where the model has it), computed in "
                            "fp32 on a CPU under bf16/fp16; sdpa: transformers' sdpa in the run's own precision; "
                            "flash_attention_2 needs the flash-attn package.")
    torch_compile: bool = Field(False, description="Compile the model with torch.compile.")
    gradient_checkpointing: bool = Field(False, description="Recompute activations in the backward pass instead of "
                                                            "keeping them: less memory, more time.")
    quantization: Literal["none", "nf4", "fp4"] = Field(
        "none", description="Load the frozen base in 4 bits (bitsandbytes) under any strategy that adds weights "
                            "(qlora sets its own).")
    group_by_length: bool = Field(True, description="Batch examples of similar length together (less padding).")
    fast_cpu_dropout: bool = Field(True, description="CPU training: dropout layers draw their masks from numpy's "
                                                     "PCG64, several times faster than torch's CPU generator; false "
                                                     "keeps torch's dropout.")
    cpu_mmap_threshold_kb: int = Field(
        0, ge=0, description="CPU: memory blocks of this many KiB or more get their own mapping, returned when freed; "
                             "0 keeps glibc's own, faster policy (`peftkit compare` uses 1024, so published peaks "
                             "follow the memory in use).")
    cache_features: bool = Field(True, description="Compute frozen parts once: the encoder's features under "
                                                   "linear-probe, a dropout-free frozen bottom of the model.")
    # checkpoints
    save_strategy: Literal["epoch", "steps", "no"] = Field(
        "epoch", description="Checkpoints while training (beside output_dir, removed when the run finishes): per "
                             "epoch, every save_steps steps, or none; resume continues from the last.")
    save_steps: int = Field(500, ge=1, description="Steps between checkpoints (save_strategy steps).")
    save_total_limit: int = Field(1, ge=1, description="How many of the newest checkpoints are kept.")
    resume: bool = Field(False, description="Continue an interrupted run from its last checkpoint (same options).")
    # where results go
    output_dir: Path | None = Field(None, description="Where the weights and run.json go (default: "
                                                      "runs/<model>-<task>-<strategy>-seed<seed>).")
    overwrite: bool = Field(False, description="Replace an earlier peftkit run in output_dir (never other files).")
    force: bool = Field(False, description="Train even when peftkit's memory estimate says the run needs more "
                                           "memory than the device has free.")

    @model_validator(mode="after")
    def _check_common(self) -> CommonOptions:
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
        if self.data_dir is None and os.environ.get("PEFTKIT_DATA_DIR"):
            self.data_dir = Path(os.environ["PEFTKIT_DATA_DIR"])
        for name in ("data_dir", "train_file", "validation_file", "test_file"):
            if getattr(self, name) is not None:  # recorded absolute: `peftkit eval` may run elsewhere
                setattr(self, name, getattr(self, name).expanduser().absolute())
        if self.output_dir is None:
            self.output_dir = (Path("runs") /
                               f"{Path(self.model).name}-{self.task or 'custom'}-{self.strategy.name}-seed{self.seed}")
        return self
