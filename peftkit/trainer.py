"""What every task's trainer shares: eval-time bookkeeping (`Timed`), best-weights selection
(`KeepBestTrainable`), mixed-precision flags and the TrainingArguments a RunConfig implies.
Each task builds its own Trainer (transformers' or TRL's) from these pieces."""

from __future__ import annotations

import tempfile
import time
from contextlib import nullcontext
from typing import Any, Callable

import torch
from torch import nn
from transformers import PrinterCallback, ProgressCallback, Trainer, TrainerCallback
from transformers.trainer_pt_utils import LengthGroupedSampler

from peftkit.checkpoints import NO_PROGRESS, complete_checkpoints, load_trainable, save_atomically, save_trainable
from peftkit.errors import PeftkitError
from peftkit.models import keep_4bit_training_layout
from peftkit.options import RunConfig


class Timed:
    """Mixin for a Trainer class: keeps the seconds spent evaluating and writing checkpoints,
    so training time can exclude them, and the seconds of training work done before `train()`
    (computing cached features). A run resumed from a checkpoint starts from the training
    time and peak memory its earlier processes reached (`prior`, peftkit.checkpoints), so its
    record covers the whole run, each step's work counted once. With a `replay`, the model's
    frozen bottom replays stored outputs while it trains and evaluates (peftkit.caches.bottom).
    A loss or gradient norm that stops being finite stops training at that step
    (`raise_diverged`)."""

    eval_seconds: float = 0.0
    setup_seconds: float = 0.0
    checkpoint_seconds: float = 0.0
    cached_features: bool = False
    frozen_features: str | None = None  # computed, loaded or partly loaded (peftkit.caches.features.FeatureStore)
    replay: Any = None
    keep_checkpoints: int = 1  # the newest checkpoints kept (save_total_limit)
    selection: Any = None      # the KeepBestTrainable whose state each checkpoint keeps
    memory: Any = None         # the run's PeakMemory, read into each checkpoint's progress
    prior: dict[str, Any] = NO_PROGRESS  # what the processes this one resumed from had reached
    _started: float | None = None

    def __init__(self, model: nn.Module, **kwargs: Any):
        _declare_trainable_additions(model)
        keep_4bit_training_layout(model)
        super().__init__(model=model, **kwargs)

    def train(self, *args: Any, **kwargs: Any) -> Any:
        self._started = time.perf_counter()
        with self.replay.active() if self.replay else nullcontext():
            return super().train(*args, **kwargs)

    def progress(self) -> dict[str, Any]:
        """The run's training time (without evaluation and checkpoint writing) and peak memory
        (each measure of PeakMemory) so far, over this process and the ones it resumed from,
        and how many processes trained. The work done before training (cached features) counts
        once: a resumed process that redoes or reloads it adds nothing."""
        elapsed = time.perf_counter() - self._started if self._started is not None else 0.0
        setup = 0.0 if self.prior["processes"] else self.setup_seconds
        now = self.memory.stop() if self.memory is not None else {}
        return {"train_time_s": self.prior["train_time_s"] + elapsed - self.eval_seconds - self.checkpoint_seconds + setup,
                "memory": {k: max(v, self.prior["memory"].get(k, 0)) for k, v in now.items()},
                "processes": self.prior["processes"] + 1}

    def compute_loss(self, model: nn.Module, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        from peftkit.caches.bottom import INDEX_COLUMN

        indices = inputs.pop(INDEX_COLUMN, None)
        if self.replay is not None and indices is not None:
            self.replay.use(indices, inputs["attention_mask"])
        result = super().compute_loss(model, inputs, *args, **kwargs)
        loss = result[0] if isinstance(result, tuple) else result
        if model.training and not torch.isfinite(loss.detach()).all():
            raise_diverged(self.state.global_step + 1, "the loss", self._get_learning_rate(), self.args.output_dir)
        return result

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Any:
        """Trainer's gradient norm, computed before every optimizer step anyway (for clipping
        and logging): a non-finite one stops the run before the step, as a non-finite loss does."""
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if grad_norm is not None and not torch.isfinite(torch.as_tensor(grad_norm)).all():
            raise_diverged(self.state.global_step + 1, "a gradient", self._get_learning_rate(), self.args.output_dir)
        return grad_norm

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """A checkpoint's weights: the trainable tensors, all that training changes, whatever the
        model (a PEFT model, peftkit's adapters on a 4-bit base, a head on cached features)."""

        save_trainable(self.accelerator.unwrap_model(self.model), output_dir or self.args.output_dir)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        load_trainable(model or self.model, resume_from_checkpoint)

    def _save_checkpoint(self, model: nn.Module, trial: Any) -> None:
        """Trainer's checkpoint, made complete in a staging folder and then renamed into place,
        with the checkpoint selection's state (peftkit.checkpoints)."""

        start = time.perf_counter()
        progress = self.progress()
        try:
            save_atomically(self, lambda: super(Timed, self)._save_checkpoint(model, trial), self.selection, progress)
        finally:
            self.checkpoint_seconds += time.perf_counter() - start

    def _get_eval_sampler(self, eval_dataset: Any) -> Any:
        """Evaluation in the data set's order. transformers 5 reuses the training sampler's
        length grouping for evaluation, a seeded shuffle of the rows: harmless where labels
        travel with the predictions, wrong wherever predictions are matched to rows by position
        (QA's windows to their questions and contexts scored MiniLM's SQuAD answers from other
        windows: F1 0.05)."""
        from torch.utils.data import SequentialSampler

        sampler = super()._get_eval_sampler(eval_dataset)
        return SequentialSampler(eval_dataset) if isinstance(sampler, LengthGroupedSampler) else sampler

    def evaluate(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        start = time.perf_counter()
        try:
            return super().evaluate(*args, **kwargs)
        finally:
            self.eval_seconds += time.perf_counter() - start


class TimedTrainer(Timed, Trainer):
    """transformers' Trainer with peftkit's eval-time bookkeeping, for models whose loss is a
    mean over the batch (sequence classifiers)."""

    def __init__(self, model: nn.Module, **kwargs: Any):
        super().__init__(model, **kwargs)
        # A model whose forward takes **kwargs is assumed to normalise its loss by the
        # `num_items_in_batch` Trainer passes; a classifier's loss ignores it and is a batch
        # mean. Left assumed, Trainer neither divides by the gradient accumulation steps nor
        # leaves data-parallel ranks unscaled: gradients came out 2x with 2 accumulation steps
        # or 2 processes (tests/test_distributed.py), which changes clipping and SGD.
        self.model_accepts_loss_kwargs = False


def timed_trainer(model: nn.Module, config: RunConfig, scratch_dir: str, tokenizer: Any, collator: Any,
                  strategy: Any = None, train: Any = None, evaluation: Any = None, callbacks: list | None = None,
                  label_names: tuple[str, ...] = ("labels",), group_by_length: bool | None = None,
                  **metrics: Any) -> TimedTrainer:
    """The TimedTrainer a task trains (`strategy` given: its parameter groups, under the run's
    optimizer) or evaluates with: the run's TrainingArguments, its data and collator, and the
    task's `compute_metrics` / `preprocess_logits_for_metrics` in `metrics`."""
    optimizer = None if strategy is None else build_optimizer(
        config.optimizer, strategy.param_groups(model, config.lr, config.weight_decay))
    return TimedTrainer(model=model, args=training_arguments(config, scratch_dir, group_by_length, label_names=label_names),
                        train_dataset=train, eval_dataset=evaluation, processing_class=tokenizer, data_collator=collator,
                        optimizers=(optimizer, None), callbacks=callbacks, **metrics)


def evaluate_once(build: Callable[[str], Any]) -> dict[str, float]:
    """Build a trainer in a scratch directory (`build(scratch_dir)`), evaluate its eval set
    once without printing (the caller prints what it wants), and return the metrics without
    their `eval_` prefix."""
    with tempfile.TemporaryDirectory(prefix="peftkit-eval-") as scratch:
        trainer = build(scratch)
        trainer.remove_callback(PrinterCallback)
        trainer.remove_callback(ProgressCallback)
        return {k.removeprefix("eval_"): v for k, v in trainer.evaluate().items()}


def _declare_trainable_additions(model: nn.Module) -> None:
    """Trainer refuses a 4-bit model unless PEFT adapters sit on it, assuming nothing else
    can train there. peftkit's own adapters, biases and heads on a frozen 4-bit base are such
    trainable additions; they are declared with the flag transformers' PEFT integration sets."""
    from peft import PeftModel

    if getattr(model, "is_quantized", False) and not isinstance(model, PeftModel):
        model._hf_peft_config_loaded = True


def raise_diverged(step: int, what: str, lr: float, checkpoints: str) -> None:
    """Stop a run whose loss or gradients stopped being finite (checked in `Timed`), with one
    line naming the step and learning rate, instead of training on NaN to the end and saving it;
    the last good checkpoint (in `checkpoints`) stays."""
    from pathlib import Path

    kept = complete_checkpoints(Path(checkpoints))
    saved = f"the last good checkpoint stays in {kept[-1]}" if kept else "nothing was saved"
    raise PeftkitError(f"training diverged at step {step}: {what} is NaN or infinite (learning rate {lr:.3g}); {saved}: "
                       "lower --learning-rate, keep max_grad_norm on, or use precision fp32/bf16 over fp16")


class KeepBestTrainable(TrainerCallback):
    """Remembers the trainable weights at the best evaluation, stops after `patience`
    evaluations without improvement, and restores the best weights at the end.

    Trainer's own `load_best_model_at_end` needs a full checkpoint on disk per evaluation;
    this keeps only the trainable tensors, in memory."""

    def __init__(self, model: nn.Module, metric: str, patience: int | None, greater_is_better: bool = True,
                 recorded: tuple[str, ...] = ("accuracy", "macro_f1", "mcc", "loss")):
        self.model, self.metric, self.patience = model, f"eval_{metric}", patience
        self.sign = 1.0 if greater_is_better else -1.0
        self.recorded = recorded
        self.best: float | None = None
        self.best_epoch: float | None = None
        self.snapshot: dict[str, torch.Tensor] = {}
        self.bad_evals = 0
        self.history: list[dict[str, float]] = []  # every evaluation, in order: epoch and metrics

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None, **kw: Any) -> None:
        value = (metrics or {}).get(self.metric)
        if value is None:
            return
        self.history.append({"epoch": state.epoch, **{k.removeprefix("eval_"): v for k, v in metrics.items()
                                                       if k.removeprefix("eval_") in self.recorded}})
        if self.best is None or self.sign * value > self.sign * self.best:
            self.best, self.best_epoch, self.bad_evals = value, state.epoch, 0
            self.snapshot = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        else:
            self.bad_evals += 1
            if self.patience is not None and self.bad_evals >= self.patience:
                control.should_training_stop = True

    def state_dict(self) -> dict[str, Any]:
        """What a checkpoint keeps of the selection: the best so far, its weights, the history."""
        return {"best": self.best, "best_epoch": self.best_epoch, "bad_evals": self.bad_evals,
                "history": self.history, "snapshot": self.snapshot}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best, self.best_epoch, self.bad_evals = state["best"], state["best_epoch"], state["bad_evals"]
        self.history, self.snapshot = state["history"], state["snapshot"]

    def restore(self) -> None:
        with torch.no_grad():
            for name, param in self.model.named_parameters():
                if name in self.snapshot:
                    param.copy_(self.snapshot[name])


def precision_flags(precision: str) -> dict[str, bool]:
    """Trainer's mixed-precision flags for a resolved precision (RunConfig.compute_precision)."""
    return {"bf16": precision == "bf16", "fp16": precision == "fp16"}


def autocast_for(config: RunConfig) -> Any:
    """The autocast context the run computes under outside Trainer (evaluation, generation,
    prediction), as Trainer does inside: trainable fp32 weights meet a bf16/fp16 base."""
    precision = config.compute_precision()
    if precision == "fp32":
        return nullcontext()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.autocast(device, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def torch_dtype(name: str) -> torch.dtype:
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def build_optimizer(name: str, groups: list[dict]) -> torch.optim.Optimizer:
    """The optimizer a run asks for, over a strategy's parameter groups (each with its lr and
    weight decay): torch's AdamW or SGD (no momentum: no state), bitsandbytes' 8-bit AdamW
    (plain or paged) or paged 32-bit AdamW, or transformers' Adafactor at a fixed lr."""
    if name == "adamw":
        return torch.optim.AdamW(groups, fused=_fusable(groups))
    if name == "sgd":
        return torch.optim.SGD(groups)
    if name == "adafactor":
        from transformers.optimization import Adafactor

        return Adafactor(groups, scale_parameter=False, relative_step=False, warmup_init=False)
    import bitsandbytes as bnb

    return {"adamw-8bit": bnb.optim.AdamW8bit, "paged-adamw-8bit": bnb.optim.PagedAdamW8bit,
            "paged-adamw-32bit": bnb.optim.PagedAdamW32bit}[name](groups)


def _fusable(groups: list[dict]) -> bool | None:
    """Whether torch's fused AdamW can step these parameters (floating tensors on CPU or CUDA;
    None leaves torch's default). One pass over each tensor instead of the foreach path's
    several: a MiniLM full fine-tuning step spent 128 ms in AdamW's foreach path and 28 ms fused
    (2 CPU threads). Trainer's own default optimizer is the fused one."""
    params = [p for group in groups for p in group["params"]]
    return True if params and all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params) else None


def training_arguments(config: RunConfig, scratch_dir: str, group_by_length: bool | None = None,
                       args_class: type | None = None, label_names: tuple[str, ...] = ("labels",), **extra: Any) -> Any:
    """TrainingArguments (or a subclass such as TRL's SFTConfig, with its `extra` fields, which
    also override these defaults) from a RunConfig; checkpoints go to `scratch_dir` (the run saves its own outputs). `label_names`: the batch's
    targets (extractive QA has two: the answer's start and end positions)."""
    from transformers import TrainingArguments

    group_by_length = config.group_by_length if group_by_length is None else group_by_length
    defaults = dict(
        output_dir=scratch_dir,
        num_train_epochs=config.epochs,
        learning_rate=config.lr,
        per_device_train_batch_size=config.batch_size,
        per_device_eval_batch_size=config.eval_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup_ratio,
        lr_scheduler_type=config.lr_scheduler,
        eval_strategy="epoch" if config.select == "best" else "no",
        save_strategy=config.save_strategy,  # peftkit.checkpoints: written atomically, rotated by Timed
        save_steps=config.save_steps,
        logging_strategy="epoch",
        report_to="none",
        seed=config.seed,
        data_seed=config.seed,
        activation_checkpointing=config.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False} if config.gradient_checkpointing else None,
        train_sampling_strategy="group_by_length" if group_by_length else "random",
        length_column_name="length",
        remove_unused_columns=False,
        label_names=list(label_names),
        dataloader_num_workers=0,
        disable_tqdm=False,  # transformers hides the bar when its log level is quiet; we want it
        max_grad_norm=config.max_grad_norm,
        use_cpu=not torch.cuda.is_available(),  # transformers refuses bf16 on CPU unless told the run is on CPU
        torch_compile=config.torch_compile,
        **precision_flags(config.compute_precision()),
    )
    return (args_class or TrainingArguments)(**{**defaults, **extra})
