"""A toy task kind, to show (and test) that a new kind is one file and one decorator: is the
number of words in a text even or odd? It reads any file with a `sentence` column and makes
its own labels; model, collator and trainer come from sequence classification."""

from __future__ import annotations

from typing import Any

from peftkit.data import cap_samples, read_splits, require_columns
from peftkit.tasks.base import TaskData, register_task
from peftkit.tasks.classification import Classification


@register_task("toy-parity")
class WordCountParity(Classification):
    description = "a text -> whether it has an even or odd number of words"
    metrics = ("accuracy", "loss")
    table_metrics = ("accuracy",)

    def load_data(self, config: Any, dataset: Any) -> TaskData:
        splits = cap_samples(read_splits(config, dataset), config)
        require_columns(splits, ["sentence"], "the toy task reads a 'sentence' column")
        labelled = {split: data.map(lambda row: {"labels": len(row["sentence"].split()) % 2},
                                    remove_columns=[c for c in data.column_names if c != "sentence"])
                    for split, data in splits.items()}
        return TaskData(labelled["train"], labelled["validation"], {"label_names": ["even", "odd"], "text_columns": ["sentence"]},
                        test=labelled.get("test"))
