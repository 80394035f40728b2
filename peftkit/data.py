"""Data sources: built-in GLUE tasks (hub or a local directory) and the user's own files.

Everything ends as a `LabeledData`: train and validation `datasets.Dataset`s with the text
columns and an integer `labels` column, plus the label names. Problems (missing file or
column, a validation label the training set never had) are reported before any model loads.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from peftkit.config import RunConfig
from peftkit.errors import PeftkitError


@dataclass(frozen=True)
class BuiltinTask:
    """A built-in task: where to find it and what its columns mean."""

    text_columns: tuple[str, ...]
    label_names: tuple[str, ...]
    hub: tuple[str, str]
    label_column: str = "label"


BUILTIN_TASKS = {
    "sst2": BuiltinTask(("sentence",), ("negative", "positive"), ("nyu-mll/glue", "sst2")),
    "rte": BuiltinTask(("sentence1", "sentence2"), ("entailment", "not_entailment"), ("nyu-mll/glue", "rte")),
}

FILE_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
SPLITS = ("train", "validation")


@dataclass
class LabeledData:
    """Train and validation splits with integer `labels`, and what those integers mean."""

    train: Any
    validation: Any
    text_columns: list[str]
    label_names: list[str]


def load_data(config: RunConfig) -> LabeledData:
    """Load, check and label-encode the data the config names."""
    builtin = BUILTIN_TASKS.get(config.task or "")
    if config.train_file is None and builtin is None:
        raise PeftkitError(
            f"unknown task '{config.task}': use one of {', '.join(BUILTIN_TASKS)} "
            "or give your own data with --train-file/--validation-file"
        )
    splits = _read_splits(config, builtin)
    text_columns = config.text_columns or (list(builtin.text_columns) if builtin and not config.train_file else None)
    label_column = config.label_column or (builtin.label_column if builtin else "label")
    if text_columns is None:
        text_columns = _guess_text_column(splits["train"].column_names)
    for split, dataset in splits.items():
        for column in [*text_columns, label_column]:
            if column not in dataset.column_names:
                raise PeftkitError(
                    f"{split} data has no column '{column}' (columns: {', '.join(dataset.column_names)}); "
                    "name the right ones with --text-column/--label-column"
                )
    if config.max_train_samples:
        splits["train"] = splits["train"].select(range(min(config.max_train_samples, len(splits["train"]))))
    if config.max_eval_samples:
        splits["validation"] = splits["validation"].select(range(min(config.max_eval_samples, len(splits["validation"]))))

    known = list(builtin.label_names) if builtin and not config.train_file and not config.label_column else None
    label_names, encode = _label_encoding(splits["train"][label_column], known)
    for split, dataset in splits.items():
        for row, value in enumerate(dataset[label_column]):
            if encode(value) is None:
                raise PeftkitError(
                    f"{split} row {row}: label {value!r} is not in the label set {label_names}; "
                    "fix the data or train on data that has this label"
                )
        keep = [*text_columns, label_column]
        dataset = dataset.remove_columns([c for c in dataset.column_names if c not in keep])
        splits[split] = dataset.map(lambda b: {"labels": [encode(v) for v in b[label_column]]}, batched=True,
                                    remove_columns=[label_column] if label_column != "labels" else [])
    return LabeledData(splits["train"], splits["validation"], list(text_columns), label_names)


def _read_splits(config: RunConfig, builtin: BuiltinTask | None) -> dict[str, Any]:
    import datasets

    if config.train_file is not None:
        files = {"train": config.train_file, "validation": config.validation_file}
        return {split: _read_file(Path(path), split) for split, path in files.items()}
    if config.data_dir is not None:
        directory = Path(config.data_dir) / str(config.task)
        files = {split: directory / f"{split}.jsonl" for split in SPLITS}
        for split, path in files.items():
            if not path.is_file():
                raise PeftkitError(
                    f"no {split} file at {path}: --data-dir must hold {config.task}/train.jsonl and {config.task}/validation.jsonl"
                )
        return {split: _read_file(path, split) for split, path in files.items()}
    try:
        loaded = datasets.load_dataset(*builtin.hub)
    except Exception as err:  # noqa: BLE001 - any hub failure means the same thing to the user
        raise PeftkitError(
            f"cannot download {builtin.hub[0]}/{builtin.hub[1]} ({type(err).__name__}); "
            "pass --data-dir DIR (or set PEFTKIT_DATA_DIR) with DIR/<task>/{train,validation}.jsonl"
        ) from None
    return {split: loaded[split] for split in SPLITS}


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


def _guess_text_column(columns: list[str]) -> list[str]:
    for candidate in ("text", "sentence", "content"):
        if candidate in columns:
            return [candidate]
    raise PeftkitError(f"cannot tell which column holds the text (columns: {', '.join(columns)}); pass --text-column")


def _label_encoding(train_labels: list[Any], known: list[str] | None):
    """Label names and a value -> index function (None for a value outside the set).

    Built-in tasks have fixed names over integer labels. Otherwise the names are the
    training set's distinct values: strings sorted, integers in numeric order."""
    if known is not None:
        return known, lambda v: v if isinstance(v, int) and 0 <= v < len(known) else None
    values = sorted(set(train_labels), key=lambda v: (isinstance(v, str), v))
    if any(isinstance(v, bool) or not isinstance(v, (int, str)) for v in values):
        raise PeftkitError(f"labels must be strings or integers, found {values[:5]}")
    index = {v: i for i, v in enumerate(values)}
    return [str(v) for v in values], index.get
