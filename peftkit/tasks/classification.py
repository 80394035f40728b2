"""Sequence classification: one text or a sentence pair -> one label, through a new head
(`AutoModelForSequenceClassification`) read from the pooled vector or the last token.

Data: built-in `sst2`, `rte`, or the user's files with `--text-column` (twice for a pair)
and `--label-column` (strings or integers; the label names are saved with the model).
Metrics: accuracy (selects), macro-F1, Matthews correlation. When nothing below the head
trains (linear probing) the frozen model's output is computed once and cached; when a
dropout-free frozen bottom sits below every trainable weight, it is replayed
(peftkit.caches.features, peftkit.caches.bottom).
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any, Callable, ClassVar

import numpy as np

from peftkit.data import cap_samples, read_splits, require_columns, split_off
from peftkit.errors import PeftkitError
from peftkit.options import ClassificationOptions
from peftkit.tasks.base import (DATASETS, BuiltinDataset, Evaluation, Prepared, Task, TaskData, cut_by_truncation,
                                register_task, take_truncation_counts)
from peftkit.anatomy import head_is_one_linear, inspect_model

if TYPE_CHECKING:
    from torch import nn

    from peftkit.options import RunConfig
    from peftkit.record import RunRecord

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")

DATASETS["sst2"] = BuiltinDataset("classification", {"text_columns": ["sentence"], "label_column": "label"},
                                  hub=("nyu-mll/glue", "sst2"), label_names=("negative", "positive"))
DATASETS["rte"] = BuiltinDataset("classification", {"text_columns": ["sentence1", "sentence2"], "label_column": "label"},
                                 hub=("nyu-mll/glue", "rte"), label_names=("entailment", "not_entailment"))


@register_task("classification")
class Classification(Task):
    description = "one text or a sentence pair -> a label (new classifier head)"
    model_class = "AutoModelForSequenceClassification"
    model_suffix = "ForSequenceClassification"
    peft_task_type = "SEQ_CLS"
    metrics = ("accuracy", "macro_f1", "mcc", "loss")
    selects = "accuracy"
    primary = "accuracy"
    table_metrics = ("accuracy", "macro_f1", "mcc")
    options = ClassificationOptions
    reads_one_vector = True

    def trained_beside(self, model: nn.Module) -> tuple[str, ...]:
        return inspect_model(model).head_modules

    def load_data(self, config: RunConfig, dataset: BuiltinDataset | None) -> TaskData:
        """Checked splits with the text columns and an integer `labels` column."""
        splits = read_splits(config, dataset)
        own_files = config.train_file is not None
        defaults = dataset.columns if dataset and not own_files else {}
        text_columns = config.text_columns or defaults.get("text_columns") or _guess_text_column(splits["train"].column_names)
        label_column = config.label_column or defaults.get("label_column", "label")
        require_columns(splits, [*text_columns, label_column], "name the right ones with --text-column/--label-column")
        splits = cap_samples(splits, config)

        known = list(dataset.label_names) if dataset and not own_files and not config.label_column else None
        label_names, encode = _label_encoding(splits["train"][label_column], known)
        for split, data in splits.items():
            for row, value in enumerate(data[label_column]):
                if encode(value) is None:
                    raise PeftkitError(f"{split} row {row}: label {value!r} is not in the label set {label_names}; "
                                       "fix the data or train on data that has this label")
            keep = [*text_columns, label_column]
            data = data.remove_columns([c for c in data.column_names if c not in keep])
            splits[split] = data.map(lambda b: {"labels": [encode(v) for v in b[label_column]]}, batched=True,
                                     remove_columns=[label_column] if label_column != "labels" else [])
        present = sorted(set(splits["train"]["labels"]))
        if len(present) < 2:
            raise PeftkitError(f"the training data has one label only ({label_names[present[0]] if present else 'none'}): "
                               "a classifier needs examples of at least two; check the label column or the data")
        overlap = _repeated_in_train(splits, list(text_columns))
        return TaskData(splits["train"], splits["validation"],
                        {"label_names": label_names, "text_columns": list(text_columns), "validation_in_train": overlap},
                        test=splits.get("test"))

    def load_model(self, source: Any, info: dict[str, Any], tokenizer: Any, quantization: Any = None,
                   **weights: Any) -> nn.Module:
        from peftkit.models import load_for_classification

        return load_for_classification(source, info["label_names"], tokenizer, quantization, auto_class=self.model_class,
                                       **weights)

    def hold_out_selection(self, data: TaskData, config: RunConfig) -> None:
        """The selection slice keeps each label's share of the training data."""
        from datasets import ClassLabel

        labelled = data.train.cast_column("labels", ClassLabel(names=data.info["label_names"]))
        data.train, data.selection = split_off(labelled, config.selection_fraction, config.seed, stratify="labels")

    def prepare(self, data: TaskData, tokenizer: Any, config: RunConfig) -> Prepared:
        """Token ids per split, and how many examples each split had cut at `max_length`."""
        columns = data.info["text_columns"]
        splits, truncated = take_truncation_counts({
            name: tokenize(split, tokenizer, columns, config.max_length, sort=name != "train")
            for name, split in data.splits().items()})
        return Prepared(splits, data.splits(), {**data.info, "truncated_examples": truncated})

    def feature_rows(self, prepared: Prepared) -> dict[str, int]:
        """One vector per training and selection example."""
        held_out = prepared.selection
        return {"cached_feature_rows": len(prepared.train) + (len(held_out) if held_out is not None else 0)}

    def build_trainer(self, model: nn.Module, strategy: Any, config: RunConfig, prepared: Prepared, tokenizer: Any,
                      scratch_dir: str, model_dir: str, callbacks: list) -> Any:
        """The Trainer for this run. With `cache_features` on, frozen computation is done once:
        when nothing below the head trains (linear probing) the Trainer trains the model's own
        head on cached features; when a frozen, dropout-free bottom sits below the lowest
        trainable layer, it replays that bottom's stored outputs (peftkit.caches.bottom)."""
        import torch

        from peftkit.caches.bottom import INDEX_COLUMN, BottomOutputs, BottomReplay, compute_bottom_outputs, frozen_bottom
        from peftkit.caches.features import FeatureDataset, FeatureStore, HeadOnFeatures, cache_key, cached_head_inputs
        from peftkit.trainer import timed_trainer

        train_dataset, eval_dataset = prepared.train, prepared.selection
        splits = [s for s in (train_dataset, eval_dataset) if s is not None]
        collate: Any = self.collator(tokenizer)
        store = FeatureStore()
        variant = repr((sorted(strategy.options().items()), config.pooling, config.quantization,
                        config.weights_dtype(), config.compute_precision()))
        on_features = strategy.frozen_below_head and config.cache_features and head_is_one_linear(model)
        replay = None
        if on_features:
            from peftkit.trainer import autocast_for

            with autocast_for(config):  # features of a bf16 base computed as training computes them
                features = [FeatureDataset(cached_head_inputs(store, model, model_dir, tokenizer, split, collate,
                                                              config.max_length, config.eval_batch_size, variant=variant),
                                           split["labels"])
                            for split in splits]
            train_dataset, eval_dataset = features[0], features[1] if len(features) > 1 else None
            model = HeadOnFeatures(model.get_submodule(inspect_model(model).head_modules[0]), model.config.num_labels)
            collate = features[0].collate
        elif config.cache_features and (bottom := frozen_bottom(model)):
            site = f"{inspect_model(model).layers_prefix}.{bottom - 1}"
            outputs = BottomOutputs.joined([
                BottomOutputs(**store.get(cache_key(model_dir, tokenizer, split, config.max_length, site, variant),
                                          lambda split=split: vars(compute_bottom_outputs(model, bottom, split, collate,
                                                                                          config.eval_batch_size))))
                for split in splits
            ])
            replay = BottomReplay(model, bottom, outputs)
            train_dataset = train_dataset.add_column(INDEX_COLUMN, list(range(len(train_dataset))))
            if eval_dataset is not None:  # its stored rows follow the training set's
                eval_dataset = eval_dataset.add_column(
                    INDEX_COLUMN, list(range(len(train_dataset), len(train_dataset) + len(eval_dataset))))

        group = config.group_by_length and not on_features
        trainer = timed_trainer(model, config, scratch_dir, tokenizer, collate, strategy, train_dataset, eval_dataset,
                                callbacks, group_by_length=group, compute_metrics=self.metric_function(prepared.info),
                                preprocess_logits_for_metrics=self.reduce_logits)
        # the frozen work counts in training time whether this run computed it or read it back
        trainer.setup_seconds, trainer.replay, trainer.frozen_features = store.seconds, replay, store.source
        trainer.cached_features = on_features
        return trainer

    def evaluate(self, model: nn.Module, config: RunConfig, prepared: Prepared, tokenizer: Any,
                 split: str = "validation") -> Evaluation:
        """Metrics of the whole model (as saved) on one split, batched as in training."""
        from peftkit.trainer import evaluate_once, timed_trainer

        metrics = evaluate_once(lambda scratch: timed_trainer(
            model, config, scratch, tokenizer, self.collator(tokenizer), evaluation=prepared.splits[split],
            compute_metrics=self.metric_function(prepared.info), preprocess_logits_for_metrics=self.reduce_logits))
        return Evaluation({k: v for k, v in metrics.items() if self.records_metric(k)})

    def predict(self, model: nn.Module, tokenizer: Any, record: RunRecord, examples: list[list[str]],
                config: RunConfig) -> list[str]:
        """Each input's predicted label and its probability ("label<TAB>probability"), in
        batches of `eval_batch_size`."""
        import torch

        columns, names = record.data["text_columns"], record.data["label_names"]
        for example in examples:
            if len(example) != len(columns):
                raise PeftkitError(f"this run classifies {len(columns)} text(s) per example ({', '.join(columns)}); "
                                   f"got {len(example)}")
        lines = []
        for first in range(0, len(examples), config.eval_batch_size):
            batch = examples[first: first + config.eval_batch_size]
            texts = [[example[i] for example in batch] for i in range(len(columns))]
            inputs = tokenizer(*texts, truncation=True, max_length=config.max_length, padding=True, return_tensors="pt")
            with torch.no_grad():
                probs = model(**{k: v.to(model.device) for k, v in inputs.items()}).logits.float().softmax(-1)
            lines += [f"{names[int(row.argmax())]}\t{float(row.max()):.4f}" for row in probs]
        return lines

    def input_fields(self, record: RunRecord) -> list[str]:
        return list(record.data["text_columns"])

    # What the shared trainer and evaluation take from a kind of classification (a token
    # classifier overrides them): the collator, the metrics, and a reduction of each batch's
    # logits before they are gathered (None: keep them whole).
    reduce_logits: ClassVar[Any] = None

    def collator(self, tokenizer: Any) -> Any:
        return PadToLongest(tokenizer)

    def metric_function(self, info: dict[str, Any]) -> Callable[[Any], dict[str, float]]:
        return compute_metrics

    def records_metric(self, name: str) -> bool:
        """Whether the run record keeps a metric the evaluation computed."""
        return name in self.metrics


def tokenize(dataset: Any, tokenizer: Any, text_columns: list[str], max_length: int, sort: bool = False) -> Any:
    """Token ids per example, truncated, not padded (the collator pads each batch to its
    longest); a `length` column lets the sampler group examples of similar length.
    `sort=True` orders by length, for evaluation: batches then carry almost no padding. A
    `truncated` column (0/1) says which examples were cut at `max_length`."""

    def encode(batch: dict[str, list]) -> dict[str, list]:
        texts = [batch[c] for c in text_columns]
        out = tokenizer(*texts, truncation=True, max_length=max_length)
        out["length"] = [len(ids) for ids in out["input_ids"]]
        cut = cut_by_truncation(out["length"], max_length, lambda rows: [
            len(ids) for ids in tokenizer(*[[column[i] for i in rows] for column in texts], verbose=False)["input_ids"]])
        out["truncated"] = [int(i in cut) for i in range(len(out["length"]))]
        return out

    keep = {"labels"}
    encoded = dataset.map(encode, batched=True, remove_columns=[c for c in dataset.column_names if c not in keep])
    return encoded.sort("length") if sort else encoded


class PadToLongest:
    """Pads each batch to its own longest sequence; passes only model inputs, labels and the
    example index that a replayed frozen bottom reads (peftkit.caches.bottom)."""

    def __init__(self, tokenizer: Any):
        from transformers import DataCollatorWithPadding

        self.pad = DataCollatorWithPadding(tokenizer)

    def __call__(self, features: list[dict]) -> dict:
        from peftkit.caches.bottom import INDEX_COLUMN

        keep = (*MODEL_INPUTS, "labels", INDEX_COLUMN)
        return self.pad([{k: v for k, v in f.items() if k in keep} for f in features])


def compute_metrics(eval_pred: Any) -> dict[str, float]:
    """Accuracy, macro-F1 and Matthews correlation of the argmax predictions."""
    from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

    logits, labels = eval_pred.predictions, eval_pred.label_ids
    if isinstance(logits, tuple):
        logits = logits[0]
    predictions = np.asarray(logits).argmax(-1)
    return {
        "accuracy": float(accuracy_score(labels, predictions)),
        "macro_f1": float(f1_score(labels, predictions, average="macro")),
        "mcc": float(matthews_corrcoef(labels, predictions)),
    }


def _guess_text_column(columns: list[str]) -> list[str]:
    for candidate in ("text", "sentence", "content"):
        if candidate in columns:
            return [candidate]
    raise PeftkitError(f"cannot tell which column holds the text (columns: {', '.join(columns)}); pass --text-column")


def _repeated_in_train(splits: dict[str, Any], text_columns: list[str]) -> int:
    """How many validation examples (same texts) also appear in the training data; warned on
    stderr, since their score measures memory rather than generalization."""
    def rows(data: Any) -> list[tuple]:
        return list(zip(*(data[c] for c in text_columns)))

    seen = set(rows(splits["train"]))
    repeated = sum(row in seen for row in rows(splits["validation"]))
    if repeated:
        print(f"warning: {repeated} of {len(splits['validation'])} validation examples also appear in the training "
              "data (recorded as validation_in_train)", file=sys.stderr, flush=True)
    return repeated


def _label_encoding(train_labels: list[Any], known: list[str] | None):
    """Label names and a value -> index function (None for a value outside the set).

    Built-in data sets have fixed names over integer labels. Otherwise the names are the
    training set's distinct values: strings sorted, integers in numeric order."""
    if known is not None:
        return known, lambda v: v if isinstance(v, int) and 0 <= v < len(known) else None
    values = sorted(set(train_labels), key=lambda v: (isinstance(v, str), v))
    if any(isinstance(v, bool) or not isinstance(v, (int, str)) for v in values):
        raise PeftkitError(f"labels must be strings or integers, found {values[:5]}")
    kinds = {type(v) for v in values}
    if len(kinds) > 1:
        number, text = next(v for v in values if isinstance(v, int)), next(v for v in values if isinstance(v, str))
        raise PeftkitError(f"labels mix integers and strings ({number!r} and {text!r}): use one type in the label column")
    index = {v: i for i, v in enumerate(values)}
    return [str(v) for v in values], index.get
