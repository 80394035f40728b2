"""One training run, top to bottom: config -> model source -> data -> model + head ->
strategy -> Trainer -> eval -> saved weights + run.json. Also reloads a finished run.

Everything that can be wrong with the input is checked before weights load, and outputs are
written to a staging directory that is renamed into place only when the run succeeded, so
a failed run leaves nothing half-written behind.
"""

from __future__ import annotations

import json
import platform
import shutil
import tempfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from peftkit.allocator import set_mmap_threshold
from peftkit.config import RunConfig, make_config
from peftkit.data import load_data
from peftkit.errors import PeftkitError
from peftkit.measure import PeakMemory, count_parameters, size_on_disk, trainable_line
from peftkit.models import four_bit_config, load_for_classification, load_model_config, load_tokenizer, resolve_model
from peftkit.tasks.classification import tokenize
from peftkit.trainer import build_trainer, evaluate, precision_flags

RUN_RECORD = "run.json"
PACKAGES = ("peftkit", "torch", "transformers", "peft", "bitsandbytes", "accelerate", "datasets", "trl")


@dataclass
class RunResult:
    """What a finished run produced: where it is, and its run record."""

    output_dir: Path
    record: dict[str, Any] = field(repr=False)

    @property
    def metrics(self) -> dict[str, float]:
        return self.record["metrics"]


def train(config: RunConfig | dict[str, Any]) -> RunResult:
    """Train one model with one strategy and save it; returns the run record."""
    if not isinstance(config, RunConfig):
        config = make_config(config)
    strategy = config.strategy.build()
    output_dir = Path(config.output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not config.overwrite:
        raise PeftkitError(f"output directory {output_dir} is not empty: choose another --output-dir or pass --overwrite")
    source = resolve_model(config.model)
    model_config = load_model_config(source)
    strategy.check(model_config)
    data = load_data(config)

    from transformers import set_seed

    set_seed(config.seed)  # the new head's initial weights depend on it
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        set_mmap_threshold(config.cpu_mmap_threshold_kb)
    memory = PeakMemory(device).start()
    tokenizer = load_tokenizer(source)
    strategy.prepare_tokenizer(tokenizer, model_config)
    model = load_for_classification(source, data.label_names, tokenizer, base_quantization(config, strategy))
    if config.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model = strategy.apply(model)
    print(trainable_line(model), flush=True)
    trainable, total = count_parameters(model)

    train_set = tokenize(data.train, tokenizer, data.text_columns, config.max_length)
    eval_set = tokenize(data.validation, tokenizer, data.text_columns, config.max_length, sort=True)
    with tempfile.TemporaryDirectory(prefix="peftkit-trainer-") as scratch:
        trainer, keep_best = build_trainer(model, strategy, config, train_set, eval_set, tokenizer, scratch, source.path)
        output = trainer.train()
        keep_best.restore()
        train_time = output.metrics["train_runtime"] - trainer.eval_seconds + trainer.setup_seconds
    final = evaluate(model, config, eval_set, tokenizer)  # always the whole model, as saved
    peak = memory.stop()

    epochs_done = float(trainer.state.epoch or config.epochs)
    tokens_per_epoch = int(sum(train_set["length"]))
    record = {
        "config": config.model_dump(mode="json"),
        "learning_rate": config.lr,
        "versions": package_versions(),
        "device": _device_name(device),
        "data": {
            "train_examples": len(train_set),
            "validation_examples": len(eval_set),
            "label_names": data.label_names,
            "text_columns": data.text_columns,
            "train_tokens_per_epoch": tokens_per_epoch,
            "longest_train_example": int(max(train_set["length"])),  # tokens; they set the peak batches
            "longest_validation_example": int(max(eval_set["length"])),
        },
        "metrics": {k: v for k, v in final.items() if k in ("accuracy", "macro_f1", "mcc", "loss")},
        "cached_features": trainer.setup_seconds > 0,
        "cached_bottom_layers": trainer.replay.bottom if trainer.replay else 0,  # frozen layers computed once
        "best_epoch": keep_best.best_epoch,
        "eval_history": keep_best.history,
        "epochs_trained": epochs_done,
        "trainable_params": trainable,
        "total_params": total,
        "trainable_percent": 100 * trainable / total,
        **peak,
        "train_time_s": train_time,
        "samples_per_s": len(train_set) * epochs_done / train_time,
        "tokens_per_s": tokens_per_epoch * epochs_done / train_time,
        "saved_as": strategy.saves,
    }
    _write_outputs(output_dir, record, model, strategy, tokenizer)
    return RunResult(output_dir, json.loads((output_dir / RUN_RECORD).read_text()))


def _write_outputs(output_dir: Path, record: dict[str, Any], model: nn.Module, strategy: Any, tokenizer: Any) -> None:
    def write(staging: Path) -> None:
        strategy.save(model, staging)
        tokenizer.save_pretrained(staging)
        record["size_on_disk_bytes"] = size_on_disk(staging)
        (staging / RUN_RECORD).write_text(json.dumps(record, indent=2) + "\n")

    write_directory(output_dir, write)


def write_directory(output_dir: Path, write: Callable[[Path], None]) -> None:
    """`write` fills a fresh staging folder beside `output_dir`, which then replaces it:
    a failure leaves nothing half-written."""
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.partial-", dir=output_dir.parent))
    staging.chmod(0o755)
    try:
        write(staging)
        if output_dir.exists():
            shutil.rmtree(output_dir)
        staging.rename(output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _compute_dtype(config: RunConfig) -> torch.dtype:
    flags = precision_flags(config.precision)
    return torch.bfloat16 if flags["bf16"] else torch.float16 if flags["fp16"] else torch.float32


def base_quantization(config: RunConfig, strategy: Any) -> Any | None:
    """How the frozen base loads: as the strategy demands (qlora), else as the run's
    `quantization` option says (4-bit NF4/FP4 with double quantization), else unquantized."""
    dtype = _compute_dtype(config)
    own = strategy.quantization_config(dtype)
    if own is not None or config.quantization == "none":
        return own
    return four_bit_config(config.quantization, True, dtype)


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
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def read_record(run_dir: Path) -> dict[str, Any]:
    """The run.json of a finished run, or a clear error."""
    path = Path(run_dir) / RUN_RECORD
    try:
        return json.loads(path.read_text())
    except OSError:
        raise PeftkitError(f"{run_dir} is not a peftkit run: no readable {RUN_RECORD}") from None
    except json.JSONDecodeError as err:
        raise PeftkitError(f"{path} is not valid JSON ({err.msg}); the run is damaged, train it again") from None


def load_run(run_dir: Path, *, quantized: bool = True, **overrides: Any) -> tuple[RunConfig, nn.Module, Any, dict[str, Any]]:
    """Reload a finished run: (config, model in eval mode, tokenizer, record). `quantized=False`
    puts a QLoRA run's adapter on the unquantized base (what `peftkit merge` folds it into)."""
    record = read_record(run_dir)
    config = make_config({**record["config"], **{k: v for k, v in overrides.items() if v is not None}})
    strategy = config.strategy.build()
    source = resolve_model(config.model)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(run_dir)
    quantization = base_quantization(config, strategy) if quantized else None
    base = load_for_classification(source, record["data"]["label_names"], tokenizer, quantization)
    model = strategy.load(base, Path(run_dir))
    model.eval()
    return config, model, tokenizer, record
