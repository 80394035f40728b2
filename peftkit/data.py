"""Dataset sources, for every task kind: the user's own files, a built-in data set in a local
directory (`--data-dir DIR` holds `DIR/<name>/{train,validation}.jsonl`), or the hub.

This module only finds and reads splits and checks generic things (columns exist, sample
caps); what the columns mean is the task's business (`peftkit.tasks`). Problems are reported
in one line before any model loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftkit.errors import PeftkitError

if TYPE_CHECKING:
    from peftkit.config import RunConfig
    from peftkit.tasks.base import BuiltinDataset, TaskData

FILE_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
SPLITS = ("train", "validation")


def load_data(config: RunConfig) -> TaskData:
    """Load and check the data the config names, as its task reads it."""
    from peftkit.tasks import resolve_task

    task, dataset = resolve_task(config.task_name)
    return task.load_data(config, dataset)


def read_splits(config: RunConfig, dataset: BuiltinDataset | None) -> dict[str, Any]:
    """The train and validation splits as `datasets.Dataset`s, from wherever the config says."""
    if config.train_file is not None:
        files = {"train": config.train_file, "validation": config.validation_file}
        return {split: _read_file(Path(path), split) for split, path in files.items()}
    if dataset is None:
        raise PeftkitError(f"task '{config.task}' is a task kind, not a data set: give your own data with "
                           "--train-file/--validation-file, or name a built-in data set")
    if config.data_dir is not None:
        directory = Path(config.data_dir) / str(config.task)
        files = {split: directory / f"{split}.jsonl" for split in SPLITS}
        for split, path in files.items():
            if not path.is_file():
                raise PeftkitError(
                    f"no {split} file at {path}: --data-dir must hold {config.task}/train.jsonl and {config.task}/validation.jsonl"
                )
        return {split: _read_file(path, split) for split, path in files.items()}
    return _from_hub(str(config.task), dataset)


def _from_hub(name: str, dataset: BuiltinDataset) -> dict[str, Any]:
    import datasets

    local_only = "pass --data-dir DIR (or set PEFTKIT_DATA_DIR) with DIR/<task>/{train,validation}.jsonl"
    if dataset.hub is None:
        raise PeftkitError(f"data set '{name}' has no hub copy: {local_only}")
    try:
        loaded = datasets.load_dataset(*dataset.hub)
    except Exception as err:  # noqa: BLE001 - any hub failure means the same thing to the user
        raise PeftkitError(f"cannot download {'/'.join(dataset.hub)} ({type(err).__name__}); {local_only}") from None
    validation = "validation" if "validation" in loaded else "test"
    splits = {"train": loaded["train"], "validation": loaded[validation]}
    return {split: data.rename_columns(dict(dataset.hub_columns)) if dataset.hub_columns else data
            for split, data in splits.items()}


def _read_file(path: Path, split: str) -> Any:
    import datasets

    fmt = FILE_FORMATS.get(path.suffix.lower())
    if fmt is None:
        raise PeftkitError(f"{split} file {path}: unsupported format; use .jsonl, .json, .csv or .parquet")
    if not path.is_file():
        raise PeftkitError(f"{split} file {path} does not exist")
    try:
        return datasets.load_dataset(fmt, data_files=str(path), split="train")
    except Exception as err:  # noqa: BLE001 - parse errors from arrow/pandas vary by format
        raise PeftkitError(f"cannot read {split} file {path} as {fmt}: {str(err).splitlines()[0][:200]}") from None


def require_columns(splits: dict[str, Any], columns: list[str], fix: str) -> None:
    """Every split has every column, or one line naming the first missing one and the `fix`."""
    for split, dataset in splits.items():
        for column in columns:
            if column not in dataset.column_names:
                raise PeftkitError(f"{split} data has no column '{column}' (columns: {', '.join(dataset.column_names)}); {fix}")


def cap_samples(splits: dict[str, Any], config: RunConfig) -> dict[str, Any]:
    """The first `max_train_samples` / `max_eval_samples` examples of each split."""
    caps = {"train": config.max_train_samples, "validation": config.max_eval_samples}
    return {split: data.select(range(min(caps[split], len(data)))) if caps[split] else data
            for split, data in splits.items()}
