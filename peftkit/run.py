"""One training run, top to bottom: config -> model source -> data -> model + head ->
strategy -> Trainer -> eval -> saved weights + run.json. Also reloads a finished run.

Everything that can be wrong with the input is checked before weights load, and outputs are
written to a staging directory that is renamed into place only when the run succeeded, so
a failed run leaves nothing half-written behind.
"""

from __future__ import annotations

import json
import os
import platform
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from peftkit.checkpoints import (checkpoint_root, load_progress, load_selection, record_options, remove_checkpoints,
                                 resume_point)
from peftkit.options import RunConfig
from peftkit.cpu.allocator import set_mmap_threshold
from peftkit.cpu.dropout import use_cpu_dropout
from peftkit.errors import PeftkitError
from peftkit.loading import base_quantization, load_base, starting_source
from peftkit.measure import PeakMemory, count_parameters, size_on_disk, trainable_line
from peftkit.memory.meta import meta_model
from peftkit.models import load_model_config, load_tokenizer, ready_for_training, resolve_model
from peftkit.pooling import read_with
from peftkit.preflight import check_against_model, check_device
from peftkit.outputs import check_writable, write_directory
from peftkit.provenance import code_version, config_hash
from peftkit.record import RUN_RECORD, RunRecord, read_record
from peftkit.resolve import make_config
from peftkit.tasks import resolve_task
from peftkit.tasks.base import PREDICTIONS
from peftkit.trainer import KeepBestTrainable, autocast_for

PACKAGES = ("peftkit", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "trl", "seqeval",
            "sacrebleu", "rouge-score")


@dataclass
class RunResult:
    """What a finished run produced: where it is, and its run record."""

    output_dir: Path
    record: RunRecord = field(repr=False)

    @property
    def metrics(self) -> dict[str, float]:
        return self.record.metrics


def train(config: RunConfig | dict[str, Any]) -> RunResult:
    """Train one model with one strategy on one task and save it; returns the run record."""
    if not isinstance(config, RunConfig):
        config = make_config(config)
    strategy = config.build_strategy()
    task, dataset = resolve_task(config.task_name)
    code = code_version()  # now, before the checkout can move on while this run trains
    output_dir = Path(config.output_dir)
    check_writable(output_dir, "--output-dir")
    resume_from = resume_point(config, output_dir)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    check_device(config, device)
    source = starting_source(config, resolve_model(config.model))
    model_config = load_model_config(source)
    check_against_model(config, model_config)
    strategy.check(model_config, task)
    data = task.load_data(config, dataset)
    check_structure(model_config, strategy, task, len(data.info.get("label_names", [])), config.pooling)
    if config.select == "best":
        task.hold_out_selection(data, config)

    from transformers import set_seed

    set_seed(config.seed)  # a new head's initial weights depend on it
    if device == "cpu":
        set_mmap_threshold(config.cpu_mmap_threshold_kb)
    memory = PeakMemory(device).start()
    tokenizer = load_tokenizer(source)
    strategy.prepare_tokenizer(tokenizer, model_config)
    prepared = task.prepare(data, tokenizer, config)  # before weights load: a bad template or column fails fast
    longest = {"longest_train_example": int(max(prepared.train["length"])),  # tokens; they set the peak batches
               "longest_validation_example": int(max(prepared.validation["length"])),
               **task.longest_answers(prepared, config), **task.feature_rows(prepared)}
    check_memory(config, {"data": {**prepared.info, **longest}}, device)  # as the record will have it
    model = load_base(config, task, source, data.info, tokenizer, base_quantization(config, strategy))
    if config.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model = ready_for_training(read_with(config.pooling, model, lambda plain: strategy.apply(plain, task)),
                               half_precision=config.compute_precision() != "fp32")
    if device == "cpu" and config.fast_cpu_dropout:
        use_cpu_dropout(model)
    print(trainable_line(model), flush=True)
    trainable, total = count_parameters(model)
    if trainable == 0 and strategy.trains_anything:
        raise PeftkitError(f"strategy '{strategy.name}' trains no parameter of {config.model}: pick another strategy")

    trained: dict[str, Any] = {"cached_features": False, "cached_bottom_layers": 0, "frozen_features": None,
                               "best_epoch": None,
                               "eval_history": [], "train_loss_history": [], "epochs_trained": 0.0, "train_time_s": 0.0,
                               "resumed_from_step": None, "training_processes": 0}
    trained_memory: dict[str, int] = {}
    if strategy.trains_anything:
        if resume_from is None and is_main_process():
            record_options(config, output_dir, code["commit"])
        trained, trained_memory = _fit(model, strategy, task, config, prepared, tokenizer, source.path,
                                       checkpoint_root(output_dir), resume_from, memory)
    with autocast_for(config):
        final = task.evaluate(model, config, prepared, tokenizer)  # always the whole model, as saved; once
        test = task.evaluate(model, config, prepared, tokenizer, "test") if "test" in prepared.splits else None
    peak = {k: max(v, trained_memory.get(k, 0)) for k, v in memory.stop().items()}  # every process of a resumed run

    tokens_per_epoch = int(sum(prepared.train["length"]))
    epochs_done, train_time = trained["epochs_trained"], trained["train_time_s"]
    record = RunRecord(
        config={**config.model_dump(mode="json"), "resume": False},  # a resumed run's config retrains it whole
        provenance={**code, "config_hash": config_hash(config)},
        task_kind=task.name,
        learning_rate=config.lr,
        versions=package_versions(),
        device=_device_name(device),
        precision={"weights": config.weights_dtype(), "compute": config.compute_precision()},  # auto, resolved here
        processes=world_size(),  # data-parallel ranks; metrics and throughput are over all of them
        data={
            "train_examples": len(prepared.train),
            "selection_examples": len(prepared.selection) if prepared.selection is not None else 0,
            "validation_examples": len(prepared.validation),
            "test_examples": len(prepared.splits["test"]) if test else 0,
            **prepared.info,
            "train_tokens_per_epoch": tokens_per_epoch,
            **longest,
        },
        metrics=final.metrics,  # the validation split, scored once at the end
        test_metrics=test.metrics if test else None,
        generation=final.generation,  # how many answers were cut at max_new_tokens (tasks that generate)
        selection={"select": config.select, "metric": config.metric_for_best_model if config.select == "best" else None,
                   "on": "held-out slice of the training data" if config.select == "best" else "final weights"},
        **trained,
        trainable_params=trainable,
        total_params=total,
        trainable_percent=100 * trainable / total,
        **peak,  # peak_memory_reserved_bytes on CUDA only
        samples_per_s=len(prepared.train) * epochs_done / train_time if train_time else None,
        tokens_per_s=tokens_per_epoch * epochs_done / train_time if train_time else None,
        saved_as=strategy.saves,
    )
    if not is_main_process():  # a distributed launch: every rank holds the same weights, rank 0 writes them
        return RunResult(output_dir, record)
    _write_outputs(output_dir, record, model, strategy, tokenizer, final.predictions)
    remove_checkpoints(output_dir)  # the run is complete: nothing to resume
    return RunResult(output_dir, read_record(output_dir))


def check_structure(model_config: Any, strategy: Any, task: Any, num_labels: int = 0, pooling: str = "model") -> None:
    """Apply the strategy and the pooling to an empty (meta-device) model of the architecture:
    what cannot work (no biases for bitfit, no place for adapters, targets PEFT cannot wrap,
    mean pooling for a head that reads the sequence) fails here, in one line, before any
    weights load. Other failures are left to the real model."""
    import copy

    config = copy.deepcopy(model_config)
    if num_labels:
        config.num_labels = num_labels
    if getattr(config, "pad_token_id", None) is None:
        config.pad_token_id = 0
    try:
        meta_model(config, strategy, task, pooling)
    except PeftkitError:
        raise
    except Exception:  # noqa: BLE001 - advisory: what the empty model cannot show, the real one will
        return


def free_memory_bytes(device: str) -> int | None:
    """Memory the run can still take: free GPU memory, or the kernel's MemAvailable on CPU
    (None where neither can be read)."""
    if device == "cuda":
        return int(torch.cuda.mem_get_info()[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(config: RunConfig, lengths: dict[str, Any], device: str) -> None:
    """Before any weights load: stop (or, with `force`, warn) when `peftkit estimate`, at the
    data's longest examples (`lengths`, as a run record's "data" has them), says the run needs
    more memory than `device` has free, naming the switches that would fit."""
    from peftkit.memory.estimate import estimate_run

    free = free_memory_bytes(device)
    try:
        needed = estimate_run(config, lengths, device=device).total_bytes
    except Exception:  # noqa: BLE001 - the guard is advisory: a model the estimate cannot take still trains
        return
    if free is None or needed <= free:
        return
    gib = 2**30
    message = (f"this run needs about {needed / gib:.2f} GiB by peftkit estimate, and {device} has "
               f"{free / gib:.2f} GiB free; {_switches_that_fit(config, lengths, device, free)}")
    if not config.force:
        raise PeftkitError(message + ", or --force to try anyway")
    print(f"warning: {message} (--force: trying anyway)", file=sys.stderr, flush=True)


def _switches_that_fit(config: RunConfig, lengths: dict[str, Any], device: str, free: int) -> str:
    """The single changes (gradient checkpointing, half the batch, 8-bit optimizer states,
    qlora for lora) under which the estimate fits `free`, named as flags."""
    from peftkit.memory.estimate import estimate_run

    candidates = {"--gradient-checkpointing": {"gradient_checkpointing": True},
                  f"--batch-size {max(1, config.batch_size // 2)} (more --gradient-accumulation-steps)":
                      {"batch_size": max(1, config.batch_size // 2), "eval_batch_size": max(1, config.eval_batch_size // 2)},
                  "--optimizer paged-adamw-8bit": {"optimizer": "paged-adamw-8bit"}}
    if config.strategy.name == "lora":
        candidates["--strategy qlora"] = {"strategy": {**config.strategy.model_dump(), "name": "qlora"}}
    fitting = []
    for flag, change in candidates.items():
        try:
            changed = make_config({**config.model_dump(mode="json"), **change})
            if estimate_run(changed, lengths, device=device).total_bytes <= free:
                fitting.append(flag)
        except PeftkitError:
            continue
    return f"these fit: {', '.join(fitting)}" if fitting else "no single switch fits (try several, or a smaller model)"


def is_main_process() -> bool:
    """Rank 0 of a distributed launch (`accelerate launch`, torchrun: they set RANK), or a plain run."""
    return os.environ.get("RANK", "0") == "0"


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def _fit(model: nn.Module, strategy: Any, task: Any, config: RunConfig, prepared: Any, tokenizer: Any,
         model_dir: str, checkpoints: Path, resume_from: Path | None,
         memory: PeakMemory) -> tuple[dict[str, Any], dict[str, int]]:
    """Train with the task's trainer (its checkpoints in `checkpoints`; continuing from
    `resume_from` when given), keep the best weights by the selection metric, and return what
    the record says about training, and the peak memory over every process that trained."""
    keep_best = KeepBestTrainable(model, config.metric_for_best_model, config.early_stopping_patience,
                                  task.greater_is_better(config.metric_for_best_model), task.metrics)
    trainer = task.build_trainer(model, strategy, config, prepared, tokenizer, str(checkpoints), model_dir, [keep_best])
    trainer.keep_checkpoints, trainer.selection, trainer.memory = config.save_total_limit, keep_best, memory
    if resume_from is not None:
        load_selection(keep_best, resume_from)
        trainer.prior = load_progress(resume_from)
        print(f"resuming from {resume_from}", flush=True)
    trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    progress = trainer.progress()
    keep_best.restore()
    return {
        "cached_features": trainer.cached_features,
        "cached_bottom_layers": trainer.replay.bottom if trainer.replay else 0,  # frozen layers computed once
        "frozen_features": trainer.frozen_features,  # computed by this run or loaded; their time counts either way
        "best_epoch": keep_best.best_epoch,
        "eval_history": keep_best.history,
        "train_loss_history": [{"epoch": log["epoch"], "loss": log["loss"]} for log in trainer.state.log_history
                               if "loss" in log and "epoch" in log],  # per epoch, over all ranks
        "epochs_trained": float(trainer.state.epoch or config.epochs),
        "train_time_s": progress["train_time_s"],  # without evaluation and checkpoints, over every process
        "resumed_from_step": int(resume_from.name.split("-")[-1]) if resume_from else None,
        "training_processes": progress["processes"],  # more than 1: resumed after an interruption
    }, progress["memory"]


def _write_outputs(output_dir: Path, record: RunRecord, model: nn.Module, strategy: Any, tokenizer: Any,
                   predictions: list[dict[str, Any]] | None) -> None:
    def write(staging: Path) -> None:
        strategy.save(model, staging)
        tokenizer.save_pretrained(staging)
        if predictions is not None:
            with (staging / PREDICTIONS).open("w") as f:
                f.writelines(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions)
        written = record.model_copy(update={"size_on_disk_bytes": size_on_disk(staging)})
        (staging / RUN_RECORD).write_text(json.dumps(written.dump(), indent=2) + "\n")

    write_directory(output_dir, write, RUN_RECORD)


def package_versions() -> dict[str, str]:
    """Python and the versions of the packages that decide a run's numbers."""
    versions = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def _device_name(device: str) -> str:
    """The GPU's name, or the CPU's model, the vector instructions torch uses on it and the
    threads: times from different machines must not pass for one machine's (report lists them)."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({_cpu_model()}, {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads)"


def _cpu_model() -> str:
    """The CPU's model name as Linux reports it, else the architecture."""
    try:
        with open("/proc/cpuinfo") as info:
            return next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()
