"""Dataset sources, for every task kind: the user's own files, a built-in data set in a local
directory (`--data-dir DIR` holds `DIR/<name>/{train,validation}.jsonl`), or the hub.

This module only finds and reads splits and checks generic things (columns exist, sample
caps); what the columns mean is the task's business (`peftkit.tasks`). Problems are reported
in one line before any model loads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from peftkit.errors import PeftkitError

if TYPE_CHECKING:
    from peftkit.options import RunConfig


@dataclass(frozen=True)
class BuiltinDataset:
    """A data set known by name: its task kind, the column options it implies, where the hub
    keeps it and how the hub's columns map onto ours."""

    kind: str
    columns: dict[str, Any]                      # its kind's column options, e.g. {"text_columns": ["sentence"]}
    hub: tuple[str, ...] | None = None           # datasets.load_dataset arguments; None: local files only
    hub_columns: dict[str, str] = field(default_factory=dict)  # hub column -> our column
    label_names: tuple[str, ...] = ()            # classification: the names of integer labels
    answer_format: str = "text"                  # sft: how a reference answer is read ("text", "gsm8k")
    hub_test: bool = False                       # the hub's test split is labelled and reported (GLUE's is not)
    headline: str | None = None                  # the metric its tables lead with, where not the kind's `primary`
    directory: str | None = None                 # its folder under --data-dir, where not its name (sst2-pref: sst2-chat)


@dataclass
class TaskData:
    """A task's raw splits after column checks, and what the run record keeps about them
    (`info` is also what reloading a run needs, e.g. the label names). `selection` is the
    slice held out from the training data to choose the checkpoint on; `test` is scored once
    at the end, like validation, where the data has one."""

    train: Any
    validation: Any
    info: dict[str, Any]
    test: Any = None
    selection: Any = None

    def splits(self) -> dict[str, Any]:
        """The splits there are, by name."""
        named = {"train": self.train, "selection": self.selection, "validation": self.validation, "test": self.test}
        return {name: data for name, data in named.items() if data is not None}


FILE_FORMATS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
SPLITS = ("train", "validation")
OPTIONAL_SPLITS = ("test",)  # read when present; scored once at the end


def data_set_name(task: str) -> str:
    """The built-in data set a `--task` names: itself, or the part after KIND: (`kto:hh-rlhf-harmless`)."""
    return task.partition(":")[2] or task


def split_files(config: RunConfig, dataset: BuiltinDataset | None) -> dict[str, Path] | None:
    """The file each split is read from, each checked to exist and be of a format peftkit
    reads (no library loads: `train` answers a wrong path at once); None: the hub's copy."""
    if config.train_file is not None:
        files = {split: Path(path) for split, path in (("train", config.train_file),
                 ("validation", config.validation_file), ("test", config.test_file)) if path is not None}
    elif dataset is None:
        raise PeftkitError(f"task '{config.task}' is a task kind, not a data set: give your own data with "
                           "--train-file/--validation-file, or name a built-in data set")
    elif config.data_dir is not None:
        folder = dataset.directory or data_set_name(str(config.task))
        directory = Path(config.data_dir) / folder
        files = {split: directory / f"{split}.jsonl" for split in SPLITS}
        for split, path in files.items():
            if not path.is_file():
                raise PeftkitError(
                    f"no {split} file at {path}: --data-dir must hold {folder}/train.jsonl and {folder}/validation.jsonl"
                )
        files |= {split: directory / f"{split}.jsonl" for split in OPTIONAL_SPLITS if (directory / f"{split}.jsonl").is_file()}
    else:
        return None
    for split, path in files.items():
        if path.suffix.lower() not in FILE_FORMATS:
            raise PeftkitError(f"{split} file {path}: unsupported format; use .jsonl, .json, .csv or .parquet")
        if not path.is_file():
            raise PeftkitError(f"{split} file {path} does not exist")
    return files


def read_splits(config: RunConfig, dataset: BuiltinDataset | None) -> dict[str, Any]:
    """The train and validation splits (and a test split, where there is one) as
    `datasets.Dataset`s, from wherever the config says."""
    files = split_files(config, dataset)
    if files is None:
        return _from_hub(str(config.task), dataset)
    return {split: _read_file(path, split) for split, path in files.items()}


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
    if validation != "test" and "test" in loaded and dataset.hub_test:
        splits["test"] = loaded["test"]  # scored once at the end, beside validation
    return {split: data.rename_columns(dict(dataset.hub_columns)) if dataset.hub_columns else data
            for split, data in splits.items()}


def _read_file(path: Path, split: str) -> Any:
    import datasets

    fmt = FILE_FORMATS[path.suffix.lower()]  # split_files checked the format and that the file exists
    if path.stat().st_size == 0:
        raise PeftkitError(f"{split} file {path} is empty (0 bytes): it needs a header or one example per line")
    if fmt != "parquet":
        lines = _check_text(path, split, json_lines=path.suffix.lower() == ".jsonl")
        if lines <= (1 if fmt == "csv" else 0):
            raise PeftkitError(f"{split} file {path} has no examples (only a header?): add at least one row")
    try:
        data = datasets.load_dataset(fmt, data_files=str(path), split="train")
    except Exception as err:  # noqa: BLE001 - parse errors from arrow/pandas vary by format
        raise PeftkitError(f"cannot read {split} file {path} as {fmt}: {str(err).splitlines()[0][:200]}") from None
    if len(data) == 0:
        raise PeftkitError(f"{split} file {path} has no examples (only a header?): add at least one row")
    return data


def _check_text(path: Path, split: str, json_lines: bool = False) -> int:
    """Text data must be UTF-8: say which byte is not, rather than the parser's vague failure;
    and with `json_lines`, each non-blank line one JSON object, named by its line (the
    library's parser names only a byte offset, in its log). Returns the number of non-blank lines."""
    filled = 0
    with path.open("rb") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():  # blank lines hold only ASCII whitespace: nothing to decode
                continue
            filled += 1
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise PeftkitError(f"{split} file {path} is not UTF-8 (line {number}, byte {err.start + 1}: "
                                   f"{line[err.start:err.start + 1]!r}): re-save it as UTF-8, e.g. "
                                   f"iconv -f latin1 -t utf-8") from None
            if json_lines:
                _check_json_line(text.removeprefix("\ufeff") if number == 1 else text, path, split, number)
    return filled


JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number", bool: "true or false",
              type(None): "null"}


def _check_json_line(text: str, path: Path, split: str, number: int) -> None:
    """One line of a JSON Lines file is one JSON object, or one line naming where it is not."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as err:
        raise PeftkitError(f"{split} file {path} line {number} is not JSON ({err.msg}): {_excerpt(text)}") from None
    if not isinstance(value, dict):
        raise PeftkitError(f"{split} file {path} line {number} is not a JSON object ({JSON_TYPES[type(value)]}): "
                           f"{_excerpt(text)}; each line must be one {{...}} example")


def _excerpt(text: str, width: int = 40) -> str:
    """The start of a line, quoted, to find it by in an editor."""
    text = text.strip()
    return repr(text[:width]) + ("..." if len(text) > width else "")


def require_columns(splits: dict[str, Any], columns: list[str], fix: str) -> None:
    """Every split has every column, or one line naming the first missing one and the `fix`."""
    for split, dataset in splits.items():
        for column in columns:
            if column not in dataset.column_names:
                raise PeftkitError(f"{split} data has no column '{column}' (columns: {', '.join(dataset.column_names)}); {fix}")


def cap_samples(splits: dict[str, Any], config: RunConfig) -> dict[str, Any]:
    """The first `max_train_samples` examples of the training split, `max_eval_samples` of the others."""
    def cap(split: str) -> int | None:
        return config.max_train_samples if split == "train" else config.max_eval_samples

    return {split: data.select(range(min(cap(split), len(data)))) if cap(split) else data
            for split, data in splits.items()}


def split_off(train: Any, fraction: float, seed: int, stratify: str | None = None) -> tuple[Any, Any]:
    """(the rest, a held-out slice of `fraction` of the examples), drawn with `seed`; with
    `stratify`, every value of that (class label) column keeps its share in both."""
    if round(len(train) * fraction) < 1 or len(train) - round(len(train) * fraction) < 1:
        raise PeftkitError(f"cannot hold out {fraction:.0%} of {len(train)} training examples for checkpoint selection: "
                           "use more data, another selection_fraction, or --set select=last")
    try:
        parts = train.train_test_split(test_size=fraction, seed=seed, stratify_by_column=stratify)
    except ValueError as err:  # too few examples of some class to stratify
        raise PeftkitError(f"cannot hold out a stratified selection slice: {str(err).splitlines()[0]}; "
                           "use more data or --set select=last") from None
    return parts["train"], parts["test"]
